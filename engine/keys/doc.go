// Package keys holds vmcryptd's key hierarchy: KEKs fetched from a key
// server and kept in locked memory, per-VM and per-disk XTS DEKs (halves
// always differ), their AEAD wrapping bound to owner and purpose
// (FORMAT.md 2), the VMware keySafe codec, and the Keyring that caches
// KEKs, de-duplicates fetches, honours 'vmcryptd lock' and reports
// revoked keys. It reaches key servers only through KeyServer.
package keys

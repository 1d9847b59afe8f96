// Package container implements the vmcryptd container (FORMAT.md 3): the
// keys derived from a DEK, the two MACed header slots and their
// judgement, the embedded keySafe copy, the vmx encryption.data bundle,
// random-access I/O over XTS units (Container), header repair and the
// per-file conversions (encrypt, decrypt, rekey) that never destroy the
// only copy.
package container

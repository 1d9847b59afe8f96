// Package engine owns vmcryptd's keys and data at rest: the key hierarchy
// (KEKs from a key server, per-VM and per-disk DEKs wrapped under them),
// the encrypted container format, the VM directory model, the operations
// on VMs, and the resolver a decrypted view or an NBD export asks
// (Datastore). It reaches key servers only through the KeyServer
// interface; the XTS sector cipher lives in engine/xts.
//
// Where to look:
//   - trust.go: the FORMAT.md section 5 decision "may this file be served
//     decrypted, and under which key?" (decideTrust, pure, one Clause per
//     verdict; refusals are *RefusedError);
//   - keys.go, keyring.go, keysafe.go: KEK and DEK, wrapping, the cache;
//   - header.go, container*.go, keysafe_area.go: the container format;
//   - vmlayout.go, convcheck.go, convert.go, vmops.go: the VM model and
//     the conversions;
//   - datastore.go, viewdisk.go, blockdisk.go: the view's resolver.
package engine

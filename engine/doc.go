// Package engine is the home of vmcryptd's keys and data at rest; the
// code lives in its sub-packages, one job each, in pipeline order (each
// imports only those above it):
//
//   - engine/keys: KEK and DEK (locked memory), owner binding and
//     purpose, DEK wrap/unwrap (FORMAT.md 2), the keySafe codec, the
//     Keyring (KEK cache, de-duplicated fetches, lock, revoked keys) and
//     the KeyServer interface it reaches key servers through;
//   - engine/xts: the XTS-AES-256 sector cipher (avo assembly, pure-Go
//     reference);
//   - engine/container: the container format (FORMAT.md 3): key
//     derivation, header slots, the embedded keySafe copy, the vmx data
//     bundle, Container I/O, header repair, and per-file conversion;
//   - engine/vm: the VM directory model on formats/vmdir (layout, disks,
//     the conversion journal) and the pure FORMAT.md section 5 trust
//     decision (vm.Decide);
//   - engine/vmops: operations on VMs: encrypt, decrypt, shallow and deep
//     rekey, create, disks, core dumps, check and repair, abort, status;
//   - engine/view: the resolver a FUSE view or an NBD export asks
//     (Datastore): classification, DEK cache, placement of new files,
//     pending disks, settle, block disks.
//
// engine/enginetest holds the tests that need several of them (VM
// operations seen through a view, the FORMAT.md vectors, the planted
// attacks, the fuzz targets); engine/internal/testkit what those tests
// share.
package engine

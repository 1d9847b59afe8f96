// Package engine owns vmcryptd's keys and data at rest: the key hierarchy
// (KEKs from a key server, per-VM and per-disk DEKs wrapped under them),
// the encrypted container format, and the operations on VMs. It reaches
// key servers only through the KeyServer interface; the XTS sector cipher
// lives in engine/xts.
package engine

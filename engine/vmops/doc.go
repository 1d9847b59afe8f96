// Package vmops runs the operations on VM directories (VMOps): encrypt,
// decrypt, shallow and deep rekey, create, add and attach disks, core
// dumps under the host key, check and repair, abort of an interrupted
// conversion. Every conversion is journalled (engine/vm) and resumable.
package vmops

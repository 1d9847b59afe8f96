// Package vmdk reads VMware virtual disks: descriptors (parsed and written
// back byte for byte), hosted sparse extents ("KDMV"), stream-optimized
// extents, and a Disk that presents a descriptor and its extents as one
// readable byte range.
//
// Supported for reading: the five layouts qemu-img creates
// (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
// twoGbMaxExtentFlat, streamOptimized), VMFS flat disks (createType
// "vmfs", extent type VMFS), ZERO extents, and sparse delta disks whose
// parent is named by parentFileNameHint. Not supported: VMFSSPARSE (COWD)
// and SESPARSE deltas, raw device mappings; Open reports them by name.
//
// All file access of a Disk goes through an Opener, so a caller can hand
// in decrypting readers. Every offset read from a file is checked against
// the file's size and every table size is bounded before allocation, so a
// hostile image yields an error, not a crash or an out-of-memory.
//
// The package is pure: no crypto beyond govmomi's KeyLocator codec for the
// descriptor's encryptionKeys line, and no imports of other vmcryptd
// packages.
package vmdk

// Package enginetest holds the engine's tests that span its packages:
// VM operations seen through a view, the FORMAT.md vectors, the planted
// attacks on the trust decision, disk-full and guest-data cases, and the
// fuzz targets of the untrusted parsers. It has no code of its own.
package enginetest

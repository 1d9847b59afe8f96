// Package view is the resolver a decrypted view (fusefs) or an NBD export
// asks about a datastore (Datastore): each file's state by the trust
// decision of engine/vm, the DEK cache, the placement of files created
// through a view, pending disks and their settling, and block disks
// assembled from a descriptor's extents.
package view

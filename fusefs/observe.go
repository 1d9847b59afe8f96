package fusefs

import "time"

// Op names a FUSE operation the view answers, for latency metrics.
type Op uint8

// The operations Observer.ObserveOp reports.
const (
	OpLookup Op = iota
	OpGetattr
	OpSetattr
	OpOpen
	OpCreate
	OpRead
	OpWrite
	OpFlush
	OpFsync
	OpRelease
	OpLseek
	OpFallocate
	OpOpendir
	OpReaddir
	OpMkdir
	OpMknod
	OpUnlink
	OpRmdir
	OpRename
	OpLink
	OpSymlink
	OpReadlink
	OpStatfs
	// NumOps is the number of operations, for arrays indexed by Op.
	NumOps
)

var opNames = [NumOps]string{
	OpLookup: "lookup", OpGetattr: "getattr", OpSetattr: "setattr", OpOpen: "open", OpCreate: "create",
	OpRead: "read", OpWrite: "write", OpFlush: "flush", OpFsync: "fsync", OpRelease: "release",
	OpLseek: "lseek", OpFallocate: "fallocate", OpOpendir: "opendir", OpReaddir: "readdir",
	OpMkdir: "mkdir", OpMknod: "mknod", OpUnlink: "unlink", OpRmdir: "rmdir", OpRename: "rename",
	OpLink: "link", OpSymlink: "symlink", OpReadlink: "readlink", OpStatfs: "statfs",
}

// String is the operation's metric label, e.g. "read".
func (o Op) String() string {
	if o < NumOps {
		return opNames[o]
	}
	return "op(?)"
}

// IO names the data path of an encrypted file: what the engine does for
// one read, write or fsync request (backing-file I/O plus XTS).
type IO uint8

// The data paths Observer.ObserveIO reports.
const (
	IORead IO = iota
	IOWrite
	IOFsync
	// NumIO is the number of data paths, for arrays indexed by IO.
	NumIO
)

var ioNames = [NumIO]string{IORead: "read", IOWrite: "write", IOFsync: "fsync"}

// String is the data path's metric label, e.g. "write".
func (i IO) String() string {
	if i < NumIO {
		return ioNames[i]
	}
	return "io(?)"
}

// Observer receives the latency of every request the view answers. Its
// methods run on the request's goroutine before the reply goes to the
// kernel, so they must be quick and safe for concurrent use (Prometheus
// histograms are).
type Observer interface {
	// ObserveOp reports one FUSE request of kind op, begun at start, with
	// its answer ready (successful or not).
	ObserveOp(op Op, start time.Time)
	// ObserveIO reports the engine's part of a read, write or fsync of an
	// encrypted file, begun at start.
	ObserveIO(io IO, start time.Time)
}

// now is the start time of a request, or the zero time when nobody
// observes (sparing the clock read).
func (s *state) now() time.Time {
	if s.obs == nil {
		return time.Time{}
	}
	return time.Now()
}

// done reports op, begun at start (from now), to the observer. Call it as
// `defer s.done(OpX, s.now())`.
func (s *state) done(op Op, start time.Time) {
	if s.obs != nil {
		s.obs.ObserveOp(op, start)
	}
}

// ioDone reports an encrypted file's data path, begun at start (from now).
func (s *state) ioDone(io IO, start time.Time) {
	if s.obs != nil {
		s.obs.ObserveIO(io, start)
	}
}

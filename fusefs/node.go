package fusefs

import (
	"context"
	"errors"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// node is one file, directory or symlink of the view. It mirrors the
// backing path that the inode tree gives it, so a rename through the view
// moves it without touching an open container (whose identity is in its
// header, not its name).
type node struct {
	fs.Inode
	st *state

	// mu guards enc. It is taken on open, release and attribute calls,
	// never on the data path: reads and writes go straight to the
	// Container, which locks per unit range.
	mu  sync.Mutex
	enc *encState
	// replaced is set when the backend replaced this file on disk while
	// it was open (Settle): opens of this node then serve the new, plain
	// file by path.
	replaced bool
	// writers counts open writable handles. With the writeback cache,
	// only while it is non-zero can the kernel hold dirty pages of the
	// file (close writes them back before RELEASE).
	writers int
}

// encState is the one Container shared by every open handle of an
// encrypted file. Two Containers on one file would each keep their own
// idea of the logical size and header sequence and overwrite each
// other's header.
type encState struct {
	c        *engine.Container
	readOnly bool
	// roErrno is why a writable open failed when this state was opened
	// read-only for a reader (EROFS for a degraded container or a revoked
	// key, EACCES for a backing file we may not write): a writer that
	// finds this state open gets the same answer as if it came first.
	roErrno syscall.Errno
	refs    int
	// retired is set when the backend replaced the file on disk (Settle)
	// while this state was still referenced: reads still see the old
	// content, writes fail, since they would land in an unlinked file.
	retired atomic.Bool
	// locked is set by View.Lock: the Container is sealed and every
	// handle on it answers EACCES (lock.go).
	locked atomic.Bool
	// writes counts data-changing requests started; inflight those not
	// finished. A settle replaces the file only if neither moved.
	writes, inflight atomic.Int64
}

// beginWrite and endWrite bracket every request that changes the data.
func (es *encState) beginWrite() { es.writes.Add(1); es.inflight.Add(1) }
func (es *encState) endWrite()   { es.inflight.Add(-1) }

var (
	_ fs.NodeLookuper       = (*node)(nil)
	_ fs.NodeGetattrer      = (*node)(nil)
	_ fs.NodeSetattrer      = (*node)(nil)
	_ fs.NodeStatxer        = (*node)(nil)
	_ fs.NodeOpener         = (*node)(nil)
	_ fs.NodeCreater        = (*node)(nil)
	_ fs.NodeMkdirer        = (*node)(nil)
	_ fs.NodeMknoder        = (*node)(nil)
	_ fs.NodeRmdirer        = (*node)(nil)
	_ fs.NodeUnlinker       = (*node)(nil)
	_ fs.NodeRenamer        = (*node)(nil)
	_ fs.NodeSymlinker      = (*node)(nil)
	_ fs.NodeReadlinker     = (*node)(nil)
	_ fs.NodeLinker         = (*node)(nil)
	_ fs.NodeStatfser       = (*node)(nil)
	_ fs.NodeOpendirHandler = (*node)(nil)
	_ fs.NodeReaddirer      = (*node)(nil)
	_ fs.NodeGetxattrer     = (*node)(nil)
	_ fs.NodeSetxattrer     = (*node)(nil)
	_ fs.NodeListxattrer    = (*node)(nil)
	_ fs.NodeRemovexattrer  = (*node)(nil)
)

// rel is the node's slash path relative to the datastore root ("" for the
// root). A node whose last link was removed gets a path that does not
// exist, so name-based operations on it fail with ENOENT.
func (n *node) rel() string { return n.Path(n.Root()) }

func (n *node) abs() string { return filepath.Join(n.st.root, n.rel()) }

func (n *node) childRel(name string) string { return path.Join(n.rel(), name) }

func (n *node) childAbs(name string) string { return filepath.Join(n.abs(), name) }

// statx fills st like lstat(2) (stat(2) for the root) and returns a
// generation number from the birth time, so an inode number reused by the
// backing file system after a delete maps to a new node rather than to the
// old file's (possibly still open) one.
func statx(dirfd int, p string, flags int, st *syscall.Stat_t) (gen uint64, err error) {
	var x unix.Statx_t
	if err := unix.Statx(dirfd, p, flags|unix.AT_STATX_SYNC_AS_STAT, unix.STATX_BASIC_STATS|unix.STATX_BTIME, &x); err != nil {
		return 0, err
	}
	*st = syscall.Stat_t{
		Dev:     unix.Mkdev(x.Dev_major, x.Dev_minor),
		Ino:     x.Ino,
		Nlink:   uint64(x.Nlink),
		Mode:    uint32(x.Mode),
		Uid:     x.Uid,
		Gid:     x.Gid,
		Rdev:    unix.Mkdev(x.Rdev_major, x.Rdev_minor),
		Size:    int64(x.Size),
		Blksize: int64(x.Blksize),
		Blocks:  int64(x.Blocks),
		Atim:    syscall.Timespec{Sec: x.Atime.Sec, Nsec: int64(x.Atime.Nsec)},
		Mtim:    syscall.Timespec{Sec: x.Mtime.Sec, Nsec: int64(x.Mtime.Nsec)},
		Ctim:    syscall.Timespec{Sec: x.Ctime.Sec, Nsec: int64(x.Ctime.Nsec)},
	}
	gen = 1
	if x.Mask&unix.STATX_BTIME != 0 && (x.Btime.Sec != 0 || x.Btime.Nsec != 0) {
		gen = uint64(x.Btime.Sec)*1e9 + uint64(x.Btime.Nsec)
	}
	return gen, nil
}

func lstatPath(p string, st *syscall.Stat_t) (uint64, error) {
	return statx(unix.AT_FDCWD, p, unix.AT_SYMLINK_NOFOLLOW, st)
}

func fstatFd(fd int, st *syscall.Stat_t) (uint64, error) {
	return statx(fd, "", unix.AT_EMPTY_PATH, st)
}

// stableAttr composes the inode number like go-fuse's loopback: the
// backing inode number with the device mixed in, so a datastore that
// spans mounts does not alias inodes.
func (s *state) stableAttr(st *syscall.Stat_t, gen uint64) fs.StableAttr {
	swapped := (uint64(st.Dev) << 32) | (uint64(st.Dev) >> 32)
	swappedRoot := (s.dev << 32) | (s.dev >> 32)
	return fs.StableAttr{Mode: st.Mode & syscall.S_IFMT, Ino: (swapped ^ swappedRoot) ^ st.Ino, Gen: gen}
}

// headerSize reads the logical size from an unopened container's header
// without a key (engine.PeekHeader: unauthenticated, display only).
func headerSize(abs string) (int64, error) {
	f, err := safeopen.Open(abs, os.O_RDONLY)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var region [1024]byte
	if _, err := io.ReadFull(f, region[:]); err != nil {
		return 0, err
	}
	h, err := engine.PeekHeader(region[:])
	if err != nil {
		return 0, err
	}
	return h.Size, nil
}

// fixSize replaces st.Size of a regular file by what the view shows: the
// open container's size, or the header-reported size of an encrypted or
// locked file, or the backing size of a plain one.
func (n *node) fixSize(rel, abs string, st *syscall.Stat_t) syscall.Errno {
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return 0
	}
	n.mu.Lock()
	es := n.enc
	if es != nil {
		st.Size = es.c.Size()
	}
	n.mu.Unlock()
	if es != nil {
		return 0
	}
	class, _, err := n.st.backend.Classify(rel)
	if err != nil {
		n.st.log.Error("cannot classify file", "path", rel, "err", err)
		return syscall.EIO
	}
	if class == ClassPlain {
		return 0
	}
	size, err := headerSize(abs)
	if err != nil {
		// Damaged header: listed with size 0; open reports the error.
		size = 0
	}
	st.Size = size
	return 0
}

func (n *node) newChild(ctx context.Context, st *syscall.Stat_t, gen uint64) *fs.Inode {
	return n.NewInode(ctx, &node{st: n.st}, n.st.stableAttr(st, gen))
}

// nodeOf returns the node behind an Inode of this view.
func nodeOf(in *fs.Inode) *node {
	if in == nil {
		return nil
	}
	nn, _ := in.Operations().(*node)
	return nn
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	defer n.st.done(OpLookup, n.st.now())
	return n.entry(ctx, n.childRel(name), n.childAbs(name), out)
}

// entry makes the inode of the existing child at rel/abs and fills out.
func (n *node) entry(ctx context.Context, rel, abs string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	var st syscall.Stat_t
	gen, err := lstatPath(abs, &st)
	if err != nil {
		return nil, errnoOf(err)
	}
	ch := n.newChild(ctx, &st, gen)
	// The child may be an already-known node with an open container,
	// whose size is the authoritative one.
	if errno := nodeOf(ch).fixSize(rel, abs, &st); errno != 0 {
		return nil, errno
	}
	out.Attr.FromStat(&st)
	return ch, 0
}

// Getattr reports the backing file's attributes with the logical size;
// st_blocks stays the backing file's (what the data really occupies).
func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	defer n.st.done(OpGetattr, n.st.now())
	var st syscall.Stat_t
	n.mu.Lock()
	if es := n.enc; es != nil {
		// Through the open file: works after unlink and sees the
		// in-memory size, which may be ahead of the header on disk.
		_, err := fstatFd(int(es.c.File().Fd()), &st)
		st.Size = es.c.Size()
		n.mu.Unlock()
		if err != nil {
			return errnoOf(err)
		}
		out.FromStat(&st)
		return 0
	}
	n.mu.Unlock()
	if pf, ok := f.(*plainFile); ok {
		if _, err := fstatFd(int(pf.f.Fd()), &st); err != nil {
			return errnoOf(err)
		}
		out.FromStat(&st)
		return 0
	}
	rel, abs := n.rel(), n.abs()
	if _, err := lstatPath(abs, &st); err != nil {
		return errnoOf(err)
	}
	if errno := n.fixSize(rel, abs, &st); errno != 0 {
		return errno
	}
	out.FromStat(&st)
	return 0
}

// Statx is answered with ENOSYS so the kernel falls back to GETATTR (and
// stops asking): a plain LoopbackFile would otherwise answer statx for
// its node, and the size rules live in Getattr only.
func (n *node) Statx(ctx context.Context, f fs.FileHandle, flags uint32, mask uint32, out *fuse.StatxOut) syscall.Errno {
	defer n.st.done(OpGetattr, n.st.now())
	return syscall.ENOSYS
}

// fdFor returns a descriptor of the backing file that an open handle or
// container already holds (so attribute changes work on unlinked files),
// or -1.
func (n *node) fdFor(f fs.FileHandle) int {
	if pf, ok := f.(*plainFile); ok {
		return int(pf.f.Fd())
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.enc != nil {
		return int(n.enc.c.File().Fd())
	}
	return -1
}

func futimens(fd int, ts *[2]unix.Timespec) error {
	_, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(ts)), 0, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	defer n.st.done(OpSetattr, n.st.now())
	abs := n.abs()
	fd := n.fdFor(f)
	if mode, ok := in.GetMode(); ok {
		var err error
		if fd >= 0 {
			err = unix.Fchmod(fd, mode)
		} else {
			err = unix.Fchmodat(unix.AT_FDCWD, abs, mode, 0)
		}
		if err != nil {
			return errnoOf(err)
		}
	}
	uid, uok := in.GetUID()
	gid, gok := in.GetGID()
	if uok || gok {
		su, sg := -1, -1
		if uok {
			su = int(uid)
		}
		if gok {
			sg = int(gid)
		}
		var err error
		if fd >= 0 {
			err = unix.Fchown(fd, su, sg)
		} else {
			err = unix.Fchownat(unix.AT_FDCWD, abs, su, sg, unix.AT_SYMLINK_NOFOLLOW)
		}
		if err != nil {
			return errnoOf(err)
		}
	}
	// Size before times, so an explicit mtime is not clobbered.
	if size, ok := in.GetSize(); ok {
		if errno := n.truncate(f, int64(size)); errno != 0 {
			return errno
		}
	}
	mtime, mok := in.GetMTime()
	atime, aok := in.GetATime()
	if mok || aok {
		ts := [2]unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		if aok {
			ts[0] = unix.NsecToTimespec(atime.UnixNano())
		}
		if mok {
			ts[1] = unix.NsecToTimespec(mtime.UnixNano())
		}
		var err error
		if fd >= 0 {
			err = futimens(fd, &ts)
		} else {
			err = unix.UtimesNanoAt(unix.AT_FDCWD, abs, ts[:], unix.AT_SYMLINK_NOFOLLOW)
		}
		if err != nil {
			return errnoOf(err)
		}
	}
	return n.Getattr(ctx, f, out)
}

// truncate sets a regular file's size: through the Container for an
// encrypted file (never ftruncate on the backing file, which would cut
// ciphertext and leave the header's size wrong).
func (n *node) truncate(f fs.FileHandle, size int64) syscall.Errno {
	if pf, ok := f.(*plainFile); ok {
		if errno := n.st.mayTruncate(n.rel()); errno != 0 {
			return errno
		}
		return errnoOf(unix.Ftruncate(int(pf.f.Fd()), size))
	}
	if eh, ok := f.(*encHandle); ok {
		return eh.truncate(size)
	}
	n.mu.Lock()
	es := n.enc
	if es != nil {
		es.refs++ // keep it open while we use it outside the lock
	}
	n.mu.Unlock()
	if es != nil {
		defer n.release(es)
		return n.truncateEnc(es, size)
	}
	rel, abs := n.rel(), n.abs()
	class, reason, err := n.st.backend.Classify(rel)
	if err != nil {
		n.st.log.Error("cannot classify file", "path", rel, "err", err)
		return syscall.EIO
	}
	plainTruncate := func() syscall.Errno {
		if errno := n.st.gated("truncate", rel); errno != 0 {
			return errno
		}
		if errno := n.st.mayTruncate(rel); errno != 0 {
			return errno
		}
		return errnoOf(unix.Truncate(abs, size))
	}
	switch class {
	case ClassPlain:
		return plainTruncate()
	case ClassLocked:
		n.st.log.Warn("refused truncate of locked file", "path", rel, "reason", reason)
		return syscall.EACCES
	}
	es, errno := n.acquire(rel, true)
	if errno != 0 {
		if n.replacedByPlain(rel) {
			return plainTruncate()
		}
		return errno
	}
	defer n.release(es)
	return n.truncateEnc(es, size)
}

func (n *node) truncateEnc(es *encState, size int64) syscall.Errno {
	if es.readOnly {
		return syscall.EROFS
	}
	es.beginWrite()
	defer es.endWrite()
	if err := es.c.Truncate(size); err != nil {
		n.st.log.Error("truncate failed", "path", n.rel(), "err", err)
		return errnoOf(err)
	}
	return 0
}

// acquire returns the node's shared Container, opening it on first use.
// write says the caller needs it writable.
func (n *node) acquire(rel string, write bool) (*encState, syscall.Errno) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.replaced {
		return nil, syscall.ESTALE // the caller checks replacedByPlain
	}
	if es := n.enc; es != nil {
		if write && es.readOnly {
			// Only happens when the backing file could not be opened for
			// writing at first open; it would fail again now.
			n.st.log.Warn("encrypted file is open read-only", "path", rel)
			if es.roErrno != 0 {
				return nil, es.roErrno
			}
			return nil, syscall.EACCES
		}
		es.refs++
		return es, 0
	}
	ro := n.st.readOnly
	var roErrno syscall.Errno
	c, err := n.st.backend.Open(rel, ro)
	if err != nil && !ro && !write && (errors.Is(err, os.ErrPermission) || errors.Is(err, syscall.EROFS) || errors.Is(err, engine.ErrDegraded)) {
		// A reader of a file we may not write (read-only backing store,
		// a degraded container, a revoked key): serve it read-only.
		ro, roErrno = true, errnoOf(err)
		c, err = n.st.backend.Open(rel, true)
	}
	if err == nil && c.Health().Degraded != "" {
		n.st.log.Warn("degraded encrypted file served read-only; run vmcryptd vm check --repair", "path", rel, "why", c.Health().Degraded)
	}
	if err != nil {
		errno := errnoOf(err)
		if errno != syscall.ENOENT {
			// Damaged headers, wrong keys, I/O errors: EIO for the
			// caller, the reason in the log.
			n.st.log.Error("cannot open encrypted file", "path", rel, "err", err)
		}
		if errno == syscall.EACCES || errno == syscall.ENOENT || errno == syscall.EROFS || errno == syscall.EBUSY {
			return nil, errno
		}
		return nil, syscall.EIO
	}
	n.enc = &encState{c: c, readOnly: ro, roErrno: roErrno, refs: 1}
	return n.enc, 0
}

// release drops one reference and closes the Container with the last.
func (n *node) release(es *encState) {
	n.mu.Lock()
	defer n.mu.Unlock()
	es.refs--
	if es.refs > 0 {
		return
	}
	if n.enc == es {
		n.enc = nil
	}
	if err := es.c.Close(); err != nil {
		n.st.log.Error("closing encrypted file failed", "path", n.rel(), "err", err)
	}
}

// replacedByPlain reports whether this node's file was replaced (Settle)
// and the file now at its path is plain: only then may an open or a
// truncate that found the old container gone fall back to the plain
// path, so an encrypted file never reaches LoopbackFile or a raw
// truncate.
func (n *node) replacedByPlain(rel string) bool {
	n.mu.Lock()
	replaced := n.replaced
	n.mu.Unlock()
	if !replaced {
		return false
	}
	class, _, err := n.st.backend.Classify(rel)
	return err == nil && class == ClassPlain
}

// settle lets the backend give the file its final form (Settler) when es
// is its last handle: the container is synced first, so the backend
// reads what was written. Files it replaced are dropped from the view.
func (n *node) settle(es *encState) {
	s := n.st
	if s.settler == nil || es.readOnly || es.retired.Load() {
		return
	}
	rel := n.rel()
	if !s.settler.Unsettled(rel) {
		return
	}
	// n.mu is held through the settle, so no open can take a reference
	// to a container that is about to be replaced (acquire waits, then
	// finds the new file).
	n.mu.Lock()
	if es.refs != 1 || n.enc != es {
		n.mu.Unlock()
		return
	}
	if es.inflight.Load() != 0 {
		n.mu.Unlock()
		return // a duplicate descriptor is still writing: its close settles
	}
	gen := es.writes.Load()
	if err := es.c.Sync(); err != nil {
		n.mu.Unlock()
		s.log.Error("fsync before settling failed", "path", rel, "err", err)
		return
	}
	// Retire first, then look at the counters: a write either shows in
	// them (no replacement) or sees retired and fails (Write begins
	// before it checks retired), never lands unseen in the old file.
	unchanged := func() bool {
		es.retired.Store(true)
		if es.inflight.Load() == 0 && es.writes.Load() == gen {
			return true
		}
		es.retired.Store(false)
		return false
	}
	replaced, err := s.settler.Settle(rel, s.isOpen, unchanged)
	self := false
	for _, r := range replaced {
		if r == rel {
			self = true
			n.enc = nil // the handle's release closes it
			n.replaced = true
		}
	}
	if !self {
		es.retired.Store(false) // not replaced after all (or never asked)
	}
	n.mu.Unlock()
	if err != nil {
		s.log.Warn("new file kept as is", "path", rel, "err", err)
	}
	for _, r := range replaced {
		s.log.Info("new disk descriptor written with its key", "path", r)
		n.dropReplaced(r)
	}
}

// dropReplaced forgets a file the backend replaced on disk: its node (if
// the kernel knows it) no longer serves the old container, and the
// kernel's name cache entry is dropped, so the next lookup finds the new
// file (a new inode, with its own size).
func (n *node) dropReplaced(rel string) {
	parent := n.Root()
	comps := strings.Split(rel, "/")
	for _, c := range comps[:len(comps)-1] {
		if parent = parent.GetChild(c); parent == nil {
			return
		}
	}
	name := comps[len(comps)-1]
	if ch := nodeOf(parent.GetChild(name)); ch != nil {
		ch.mu.Lock()
		if es := ch.enc; es != nil {
			es.retired.Store(true)
			ch.enc = nil // the last handle's release closes it
		}
		ch.mu.Unlock()
	}
	if errno := parent.NotifyEntry(name); errno != 0 && errno != syscall.ENOENT {
		n.st.log.Warn("could not invalidate name cache", "path", rel, "errno", errno)
	}
}

// closeContainer closes the node's Container regardless of references;
// used once the server has stopped and no request can still use it.
func (n *node) closeContainer() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.enc == nil {
		return
	}
	if err := n.enc.c.Close(); err != nil {
		n.st.log.Error("closing encrypted file failed", "path", n.rel(), "err", err)
	}
	n.enc = nil
}

// backingFlags is what FUSE open flags become on the backing file. O_APPEND
// is dropped because the kernel already turns it into explicit offsets
// (from its view of the size); with the writeback cache the kernel may
// read pages of a write-only file, so those are opened read-write.
func (s *state) backingFlags(flags uint32) int {
	fl := int(flags) &^ (syscall.O_APPEND | syscall.O_CREAT | syscall.O_EXCL | syscall.O_NOCTTY | syscall.O_DIRECT | fuse.FMODE_EXEC)
	if s.writeback && fl&syscall.O_ACCMODE == syscall.O_WRONLY {
		fl = fl&^syscall.O_ACCMODE | syscall.O_RDWR
	}
	return fl | syscall.O_CLOEXEC | syscall.O_NOFOLLOW
}

// fuseFlags are the open flags we answer: O_DIRECT gets FOPEN_DIRECT_IO
// (bypass the page cache for that handle); concurrent direct writes are
// allowed because the Container locks per unit range.
func fuseFlags(flags uint32, encrypted bool) uint32 {
	var out uint32
	if flags&syscall.O_DIRECT != 0 {
		out |= fuse.FOPEN_DIRECT_IO
		if encrypted {
			out |= fuse.FOPEN_PARALLEL_DIRECT_WRITES
		}
	}
	return out
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	defer n.st.done(OpOpen, n.st.now())
	rel := n.rel()
	class, reason, err := n.st.backend.Classify(rel)
	if err != nil {
		n.st.log.Error("cannot classify file", "path", rel, "err", err)
		return nil, 0, syscall.EIO
	}
	switch class {
	case ClassPlain:
		return n.openPlain(rel, flags)
	case ClassLocked:
		n.st.log.Warn("refused open of locked file", "path", rel, "reason", reason)
		return nil, 0, syscall.EACCES
	}
	write := isWrite(flags)
	es, errno := n.acquire(rel, write)
	if errno != 0 {
		if n.replacedByPlain(rel) {
			return n.openPlain(rel, flags)
		}
		return nil, 0, errno
	}
	if flags&syscall.O_TRUNC != 0 && write {
		if errno := n.truncateEnc(es, 0); errno != 0 {
			n.release(es)
			return nil, 0, errno
		}
	}
	return n.newEncHandle(es, write), fuseFlags(flags, true), 0
}

func isWrite(flags uint32) bool { return flags&syscall.O_ACCMODE != syscall.O_RDONLY }

// settleForSeek makes SEEK_DATA/SEEK_HOLE answers true with the writeback
// cache: the kernel sends LSEEK without writing back dirty pages first,
// so data still in the page cache would be reported as a hole (and lost
// by sparse-aware copies such as qemu-img convert). If a writer is open,
// ask the kernel to invalidate the file's cache from off on; it writes
// dirty pages back (launder) before dropping them, through other server
// goroutines, and returns when they are with us. The LSEEK caller holds
// the inode lock, which neither invalidation nor writeback takes.
func (n *node) settleForSeek(off int64) {
	if !n.st.writeback {
		return
	}
	n.mu.Lock()
	w := n.writers
	n.mu.Unlock()
	if w == 0 {
		return
	}
	if errno := n.NotifyContent(off, 0); errno != 0 && errno != syscall.ENOENT {
		n.st.log.Warn("cannot flush cached pages before lseek", "path", n.rel(), "errno", errno)
	}
}

func (n *node) openPlain(rel string, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if errno := n.st.gated("open", rel); errno != 0 {
		return nil, 0, errno
	}
	if flags&syscall.O_TRUNC != 0 {
		if errno := n.st.mayTruncate(rel); errno != 0 {
			return nil, 0, errno
		}
	}
	fd, err := safeopen.OpenFD(filepath.Join(n.st.root, rel), n.st.backingFlags(flags), 0)
	if err != nil {
		if errors.Is(err, safeopen.ErrNotRegular) {
			n.st.log.Warn("refused open", "path", rel, "err", err)
		}
		return nil, 0, errnoOf(err)
	}
	return n.newPlainFile(fd, isWrite(flags)), fuseFlags(flags, false), 0
}

// preserveOwner gives a new file to the caller, not to root.
func preserveOwner(ctx context.Context, p string) {
	if caller, ok := fuse.FromContext(ctx); ok {
		_ = unix.Lchown(p, int(caller.Uid), int(caller.Gid))
	}
}

// exactMode sets the requested permission bits when the daemon's umask
// took some away (the kernel has already applied the caller's umask).
func exactMode(p string, st *syscall.Stat_t, mode uint32) {
	if st.Mode&07777 != mode&07777 {
		if unix.Fchmodat(unix.AT_FDCWD, p, mode&07777, 0) == nil {
			st.Mode = st.Mode&^07777 | mode&07777
		}
	}
}

func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	defer n.st.done(OpCreate, n.st.now())
	rel, abs := n.childRel(name), n.childAbs(name)
	var st syscall.Stat_t
	if _, err := lstatPath(abs, &st); err == nil {
		// It appeared behind the kernel's back: open, don't clobber.
		if flags&syscall.O_EXCL != 0 {
			return nil, nil, 0, syscall.EEXIST
		}
		ch, errno := n.Lookup(ctx, name, out)
		if errno != 0 {
			return nil, nil, 0, errno
		}
		fh, ff, errno := nodeOf(ch).Open(ctx, flags&^syscall.O_CREAT)
		if errno != 0 {
			return nil, nil, 0, errno
		}
		return ch, fh, ff, 0
	}
	c, encrypted, err := n.st.backend.Create(rel, mode&07777)
	if err != nil {
		n.st.log.Error("cannot create file", "path", rel, "err", err)
		return nil, nil, 0, errnoOf(err)
	}
	if !encrypted {
		fd, err := safeopen.OpenFD(abs, n.st.backingFlags(flags)|syscall.O_CREAT|int(flags&syscall.O_EXCL), mode&07777)
		if err != nil {
			if errors.Is(err, safeopen.ErrNotRegular) {
				n.st.log.Warn("refused open", "path", rel, "err", err)
			}
			return nil, nil, 0, errnoOf(err)
		}
		preserveOwner(ctx, abs)
		gen, err := fstatFd(fd, &st)
		if err != nil {
			unix.Close(fd)
			return nil, nil, 0, errnoOf(err)
		}
		exactMode(abs, &st, mode)
		ch := n.newChild(ctx, &st, gen)
		out.Attr.FromStat(&st)
		return ch, nodeOf(ch).newPlainFile(fd, isWrite(flags)), fuseFlags(flags, false), 0
	}
	preserveOwner(ctx, abs)
	gen, err := fstatFd(int(c.File().Fd()), &st)
	if err != nil {
		c.Close()
		return nil, nil, 0, errnoOf(err)
	}
	// The backend chose the container's mode (engine: 0600 at most in an
	// encrypted VM); never widen it to what the caller asked.
	exactMode(abs, &st, mode&st.Mode&07777)
	st.Size = c.Size()
	ch := n.newChild(ctx, &st, gen)
	cn := nodeOf(ch)
	cn.mu.Lock()
	if cn.enc != nil {
		// Same identity as a node with an open container (cannot happen
		// for a file created just now); use the one already open.
		cn.enc.refs++
		es := cn.enc
		cn.mu.Unlock()
		c.Close()
		out.Attr.FromStat(&st)
		return ch, cn.newEncHandle(es, isWrite(flags)), fuseFlags(flags, true), 0
	}
	es := &encState{c: c, refs: 1}
	cn.enc = es
	cn.mu.Unlock()
	out.Attr.FromStat(&st)
	return ch, cn.newEncHandle(es, isWrite(flags)), fuseFlags(flags, true), 0
}

func (n *node) Mknod(ctx context.Context, name string, mode, rdev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	defer n.st.done(OpMknod, n.st.now())
	if mode&syscall.S_IFMT == syscall.S_IFREG || mode&syscall.S_IFMT == 0 {
		// A regular file made by mknod(2) must follow the same placement
		// rule as one made by open(O_CREAT).
		ch, fh, _, errno := n.Create(ctx, name, syscall.O_WRONLY|syscall.O_EXCL, mode&07777, out)
		if errno != 0 {
			return nil, errno
		}
		if r, ok := fh.(fs.FileReleaser); ok {
			r.Release(ctx)
		}
		return ch, 0
	}
	if errno := n.st.gated("mknod", n.childRel(name)); errno != 0 {
		return nil, errno
	}
	abs := n.childAbs(name)
	if err := unix.Mknod(abs, mode, int(rdev)); err != nil {
		return nil, errnoOf(err)
	}
	return n.madeEntry(ctx, abs, out)
}

// madeEntry finishes a node just made at abs (a special file or a
// symlink): gives it to the caller and returns its inode, or removes it
// again if it cannot be looked at.
func (n *node) madeEntry(ctx context.Context, abs string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	preserveOwner(ctx, abs)
	var st syscall.Stat_t
	gen, err := lstatPath(abs, &st)
	if err != nil {
		unix.Unlink(abs)
		return nil, errnoOf(err)
	}
	out.Attr.FromStat(&st)
	return n.newChild(ctx, &st, gen), 0
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	defer n.st.done(OpMkdir, n.st.now())
	abs := n.childAbs(name)
	if err := unix.Mkdir(abs, mode&07777); err != nil {
		return nil, errnoOf(err)
	}
	preserveOwner(ctx, abs)
	var st syscall.Stat_t
	gen, err := lstatPath(abs, &st)
	if err != nil {
		unix.Rmdir(abs)
		return nil, errnoOf(err)
	}
	exactMode(abs, &st, mode)
	out.Attr.FromStat(&st)
	return n.newChild(ctx, &st, gen), 0
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	defer n.st.done(OpRmdir, n.st.now())
	return errnoOf(unix.Rmdir(n.childAbs(name)))
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	defer n.st.done(OpUnlink, n.st.now())
	if errno := n.st.gated("unlink", n.childRel(name)); errno != 0 {
		return errno
	}
	return errnoOf(unix.Unlink(n.childAbs(name)))
}

// mayTruncate asks the backend's Gate whether the plain file rel may be
// cut (see Gate.MayTruncate).
func (s *state) mayTruncate(rel string) syscall.Errno {
	if s.gate == nil {
		return 0
	}
	if err := s.gate.MayTruncate(rel); err != nil {
		s.log.Warn("refused truncate", "path", rel, "err", err)
		return errnoOf(err)
	}
	return 0
}

// gated refuses (EBUSY) touching files the backend's Gate says are busy
// (a VM in the middle of a conversion, which is about to replace them):
// plain opens and truncates, and the name changes unlink, rename, link,
// symlink and mknod. A rename there would leave the unconverted original
// (plaintext, during an encrypt) under its new name while the conversion
// puts its result back at the old one.
func (s *state) gated(op string, rels ...string) syscall.Errno {
	if s.gate == nil {
		return 0
	}
	for _, rel := range rels {
		if err := s.gate.MayOpen(rel); err != nil {
			s.log.Warn("refused "+op, "path", rel, "err", err)
			return errnoOf(err)
		}
	}
	return 0
}

// crossesBoundary says whether moving the regular file at oldRel to newRel
// would change how it is stored (plain into an encrypted directory or a
// container out of one); such moves get EXDEV so tools copy instead.
func (s *state) crossesBoundary(oldRel, newRel string) (bool, syscall.Errno) {
	if s.placer == nil {
		return false, 0
	}
	class, _, err := s.backend.Classify(oldRel)
	if err != nil {
		s.log.Error("cannot classify file", "path", oldRel, "err", err)
		return false, syscall.EIO
	}
	enc, err := s.placer.WouldEncrypt(newRel)
	if err != nil {
		s.log.Error("cannot place file", "path", newRel, "err", err)
		return false, syscall.EIO
	}
	return enc != (class != ClassPlain), 0
}

// moveCheck applies crossesBoundary to a directory entry about to be
// renamed or linked; directories are checked entry by entry by the tools
// that fall back to copying, so only regular files are refused here.
func (s *state) moveCheck(oldRel, oldAbs, newRel string) syscall.Errno {
	var st syscall.Stat_t
	if _, err := lstatPath(oldAbs, &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return 0
	}
	cross, errno := s.crossesBoundary(oldRel, newRel)
	if errno != 0 {
		return errno
	}
	if cross {
		return syscall.EXDEV
	}
	return 0
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	defer n.st.done(OpRename, n.st.now())
	np, ok := newParent.(*node)
	if !ok || np.st != n.st {
		return syscall.EXDEV
	}
	oldRel, oldAbs := n.childRel(name), n.childAbs(name)
	newRel, newAbs := np.childRel(newName), np.childAbs(newName)
	if errno := n.st.gated("rename", oldRel, newRel); errno != 0 {
		return errno
	}
	if errno := n.st.moveCheck(oldRel, oldAbs, newRel); errno != 0 {
		return errno
	}
	if flags&fs.RENAME_EXCHANGE != 0 {
		if errno := n.st.moveCheck(newRel, newAbs, oldRel); errno != 0 {
			return errno
		}
	}
	if flags != 0 {
		return errnoOf(unix.Renameat2(unix.AT_FDCWD, oldAbs, unix.AT_FDCWD, newAbs, uint(flags)))
	}
	return errnoOf(unix.Rename(oldAbs, newAbs))
}

func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	defer n.st.done(OpLink, n.st.now())
	tn, ok := target.(*node)
	if !ok || tn.st != n.st {
		return nil, syscall.EXDEV
	}
	if _, parent := tn.Parent(); parent == nil {
		return nil, syscall.ENOENT // unlinked: no name to link from
	}
	oldRel, oldAbs := tn.rel(), tn.abs()
	newRel, newAbs := n.childRel(name), n.childAbs(name)
	if errno := n.st.gated("link", oldRel, newRel); errno != 0 {
		return nil, errno
	}
	// A second name for an encrypted file would let it be judged by
	// either (the backend refuses containers with several names).
	if class, _, err := n.st.backend.Classify(oldRel); err != nil || class != ClassPlain {
		if err != nil {
			n.st.log.Error("cannot classify file", "path", oldRel, "err", err)
			return nil, syscall.EIO
		}
		return nil, syscall.EPERM
	}
	if errno := n.st.moveCheck(oldRel, oldAbs, newRel); errno != 0 {
		return nil, errno
	}
	if err := unix.Link(oldAbs, newAbs); err != nil {
		return nil, errnoOf(err)
	}
	return n.entry(ctx, newRel, newAbs, out)
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	defer n.st.done(OpSymlink, n.st.now())
	if errno := n.st.gated("symlink", n.childRel(name)); errno != 0 {
		return nil, errno
	}
	abs := n.childAbs(name)
	if err := unix.Symlink(target, abs); err != nil {
		return nil, errnoOf(err)
	}
	return n.madeEntry(ctx, abs, out)
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	defer n.st.done(OpReadlink, n.st.now())
	abs := n.abs()
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		k, err := unix.Readlink(abs, buf)
		if err != nil {
			return nil, errnoOf(err)
		}
		if k < size {
			return buf[:k], 0
		}
	}
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	defer n.st.done(OpStatfs, n.st.now())
	var s syscall.Statfs_t
	if err := syscall.Statfs(n.st.root, &s); err != nil {
		return errnoOf(err)
	}
	out.FromStatfsT(&s)
	return 0
}

func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	defer n.st.done(OpOpendir, n.st.now())
	ds, errno := fs.NewLoopbackDirStream(n.abs())
	return ds, 0, errno
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	defer n.st.done(OpReaddir, n.st.now())
	return fs.NewLoopbackDirStream(n.abs())
}

func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	k, err := unix.Lgetxattr(n.abs(), attr, dest)
	return uint32(k), errnoOf(err)
}

func (n *node) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	return errnoOf(unix.Lsetxattr(n.abs(), attr, data, int(flags)))
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	k, err := unix.Llistxattr(n.abs(), dest)
	return uint32(k), errnoOf(err)
}

func (n *node) Removexattr(ctx context.Context, attr string) syscall.Errno {
	return errnoOf(unix.Lremovexattr(n.abs(), attr))
}

package fusefs

import (
	"context"
	"io"
	"os"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// Attributes: lookup, stat, setattr and truncate. Sizes of encrypted files
// are their logical size (headerSize, fixSize).

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
// without a key (container.PeekHeader: unauthenticated, display only).
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
	h, err := container.PeekHeader(region[:])
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
	if class == view.FilePlain {
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
	case view.FilePlain:
		return plainTruncate()
	case view.FileLocked:
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

package fusefs

import (
	"context"
	"errors"
	"io"
	"os"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// encHandle is an open encrypted file. Every data operation goes through
// the node's Container: this type deliberately has no PassthroughFd and
// never exposes the backing descriptor to the kernel, so the kernel can
// only ever see plaintext produced by the Container.
type encHandle struct {
	n     *node
	es    *encState
	c     *container.Container
	id    uint64 // in the mount's open-handle registry
	write bool   // counted in n.writers
}

var (
	_ fs.FileReader    = (*encHandle)(nil)
	_ fs.FileWriter    = (*encHandle)(nil)
	_ fs.FileFlusher   = (*encHandle)(nil)
	_ fs.FileFsyncer   = (*encHandle)(nil)
	_ fs.FileReleaser  = (*encHandle)(nil)
	_ fs.FileLseeker   = (*encHandle)(nil)
	_ fs.FileAllocater = (*encHandle)(nil)
)

func (n *node) newEncHandle(es *encState, write bool) *encHandle {
	h := &encHandle{n: n, es: es, c: es.c, write: write}
	h.id = n.st.addHandle(n)
	if write {
		n.addWriter(1)
	}
	return h
}

func (n *node) addWriter(d int) {
	n.mu.Lock()
	n.writers += d
	n.mu.Unlock()
}

// Read decrypts into the request's own buffer: for unit-aligned requests
// (all page-cache and O_DIRECT traffic) the Container decrypts in place,
// with no copy and no allocation.
func (h *encHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	st := h.n.st
	defer st.done(OpRead, st.now())
	if h.es.locked.Load() {
		return nil, syscall.EACCES
	}
	t := st.now()
	k, err := h.c.ReadAt(dest, off)
	st.ioDone(IORead, t)
	if err != nil && err != io.EOF {
		h.n.st.log.Error("read failed", "path", h.n.rel(), "off", off, "len", len(dest), "err", err)
		return nil, ioErrno(err)
	}
	return fuse.ReadResultData(dest[:k]), 0
}

// Write encrypts in place in data, which is go-fuse's request buffer:
// nothing reads it after we return (the reply carries only a count).
func (h *encHandle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	st := h.n.st
	defer st.done(OpWrite, st.now())
	if h.es.locked.Load() {
		return 0, syscall.EACCES
	}
	if h.es.readOnly {
		return 0, syscall.EBADF
	}
	h.es.beginWrite()
	defer h.es.endWrite()
	if h.es.retired.Load() {
		h.n.st.log.Error("write to a file replaced on disk; reopen it", "path", h.n.rel())
		return 0, syscall.EIO
	}
	t := st.now()
	k, err := h.c.WriteAtInPlace(data, off)
	st.ioDone(IOWrite, t)
	if err != nil {
		h.n.st.log.Error("write failed", "path", h.n.rel(), "off", off, "len", len(data), "err", err)
		return uint32(k), ioErrno(err)
	}
	return uint32(k), 0
}

// ioErrno is errnoOf for reads and writes of data: it keeps the errnos a
// caller can act on (ENOSPC, EDQUOT, EFBIG, EINTR, EROFS); everything else,
// including corrupt or truncated containers, is EIO.
func ioErrno(err error) syscall.Errno {
	switch errno := errnoOf(err); errno {
	case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG, syscall.EINTR, syscall.EROFS:
		return errno
	}
	return syscall.EIO
}

// Flush settles a written file with its last close (see Backend.Settle); for
// everything else it has nothing to do: durability is fsync's business.
func (h *encHandle) Flush(ctx context.Context) syscall.Errno {
	defer h.n.st.done(OpFlush, h.n.st.now())
	if h.es.locked.Load() {
		return 0 // sealed: nothing to settle with
	}
	if h.write {
		h.n.settle(h.es)
	}
	return 0
}

func (h *encHandle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	st := h.n.st
	defer st.done(OpFsync, st.now())
	if h.es.locked.Load() {
		return syscall.EACCES
	}
	if h.es.readOnly {
		return 0
	}
	t := st.now()
	err := h.c.Sync()
	st.ioDone(IOFsync, t)
	if err != nil {
		h.n.st.log.Error("fsync failed", "path", h.n.rel(), "err", err)
		return ioErrno(err)
	}
	return 0
}

// Release closes the Container with the last handle (which writes a
// changed size into the header), and only then leaves the registry, so
// an empty registry means every container is closed.
func (h *encHandle) Release(ctx context.Context) syscall.Errno {
	defer h.n.st.done(OpRelease, h.n.st.now())
	if h.write {
		h.n.addWriter(-1)
	}
	h.n.release(h.es)
	h.n.st.dropHandle(h.id)
	return 0
}

func (h *encHandle) truncate(size int64) syscall.Errno {
	if h.es.locked.Load() {
		return syscall.EACCES
	}
	return h.n.truncateEnc(h.es, size)
}

// Lseek answers SEEK_DATA and SEEK_HOLE (the kernel does the others) by
// mapping the backing file's extents to logical offsets: unit i lives at
// payload offset + i*unit, and a unit that was never written is a hole
// there. Results are rounded to whole units, data down and holes up, so
// a reported hole is always all zeros.
func (h *encHandle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	defer h.n.st.done(OpLseek, h.n.st.now())
	if h.es.locked.Load() {
		return 0, syscall.EACCES
	}
	if whence != unix.SEEK_DATA && whence != unix.SEEK_HOLE {
		return 0, syscall.EINVAL
	}
	h.n.settleForSeek(int64(off))
	hdr := h.c.Header()
	size := hdr.Size
	o := int64(off)
	if o >= size {
		return 0, syscall.ENXIO
	}
	unit, base := int64(hdr.UnitSize), hdr.PayloadOff
	fd := int(h.c.File().Fd())
	if whence == unix.SEEK_DATA {
		b, err := unix.Seek(fd, base+o/unit*unit, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			return 0, syscall.ENXIO
		}
		if err != nil {
			return off, 0 // no hole support: everything is data
		}
		l := max((b-base)/unit*unit, o)
		if l >= size {
			return 0, syscall.ENXIO
		}
		return uint64(l), 0
	}
	b, err := unix.Seek(fd, base+o, unix.SEEK_HOLE)
	if err != nil {
		return uint64(size), 0
	}
	l := b - base
	if l > o {
		l = (l + unit - 1) / unit * unit
	}
	return uint64(min(max(l, o), size)), 0
}

// Allocate implements fallocate(2): mode 0 extends the logical size and
// reserves backing blocks (allocated but never written units read as
// zeros); PUNCH_HOLE frees whole units and zeroes partial ones;
// ZERO_RANGE does the same and may extend.
func (h *encHandle) Allocate(ctx context.Context, off uint64, length uint64, mode uint32) syscall.Errno {
	defer h.n.st.done(OpFallocate, h.n.st.now())
	if h.es.locked.Load() {
		return syscall.EACCES
	}
	if h.es.readOnly {
		return syscall.EBADF
	}
	o, l := int64(off), int64(length)
	if o < 0 || l <= 0 || o+l < o {
		return syscall.EINVAL
	}
	h.es.beginWrite()
	defer h.es.endWrite()
	end := o + l
	keep := mode&unix.FALLOC_FL_KEEP_SIZE != 0
	var err error
	switch mode &^ unix.FALLOC_FL_KEEP_SIZE {
	case unix.FALLOC_FL_PUNCH_HOLE:
		if !keep {
			return syscall.EOPNOTSUPP // as in Linux: punching requires KEEP_SIZE
		}
		err = h.c.PunchHole(o, l)
	case unix.FALLOC_FL_ZERO_RANGE:
		if !keep && end > h.c.Size() {
			// The grown tail is holes, which read as zeros already.
			err = h.c.Truncate(end)
		}
		if err == nil {
			err = h.c.PunchHole(o, l)
		}
	case 0:
		if !keep && end > h.c.Size() {
			err = h.c.Truncate(end)
		}
		if err == nil {
			hdr := h.c.Header()
			unit := int64(hdr.UnitSize)
			u0, u1 := o/unit, (end+unit-1)/unit
			ferr := unix.Fallocate(int(h.c.File().Fd()), unix.FALLOC_FL_KEEP_SIZE, hdr.PayloadOff+u0*unit, (u1-u0)*unit)
			if ferr != nil && !errors.Is(ferr, syscall.EOPNOTSUPP) {
				err = ferr
			}
		}
	default:
		return syscall.EOPNOTSUPP
	}
	if err != nil {
		h.n.st.log.Error("fallocate failed", "path", h.n.rel(), "mode", mode, "err", err)
		return ioErrno(err)
	}
	return 0
}

// plainFile is an open plain file: go-fuse's LoopbackFile (which may use
// kernel passthrough), plus bookkeeping for Unmount and a refusal of
// ioctls, which would otherwise run with the daemon's (root's) rights.
type plainFile struct {
	*fs.LoopbackFile
	n     *node
	f     *os.File
	id    uint64
	write bool
}

func (n *node) newPlainFile(fd int, write bool) *plainFile {
	f := os.NewFile(uintptr(fd), n.rel())
	pf := &plainFile{LoopbackFile: fs.NewLoopbackFileFromOS(f), n: n, f: f, write: write}
	pf.id = n.st.addHandle(n)
	if write {
		n.addWriter(1)
	}
	return pf
}

func (pf *plainFile) Release(ctx context.Context) syscall.Errno {
	defer pf.n.st.done(OpRelease, pf.n.st.now())
	if pf.write {
		pf.n.addWriter(-1)
	}
	errno := pf.LoopbackFile.Release(ctx)
	pf.n.st.dropHandle(pf.id)
	return errno
}

// Lseek is LoopbackFile's, after making the backing file current (see
// settleForSeek).
func (pf *plainFile) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	defer pf.n.st.done(OpLseek, pf.n.st.now())
	if whence == unix.SEEK_DATA || whence == unix.SEEK_HOLE {
		pf.n.settleForSeek(int64(off))
	}
	return pf.LoopbackFile.Lseek(ctx, off, whence)
}

// Read, Write, Flush and Fsync are LoopbackFile's, observed. (With
// kernel passthrough, reads and writes never reach the view.)
func (pf *plainFile) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	defer pf.n.st.done(OpRead, pf.n.st.now())
	return pf.LoopbackFile.Read(ctx, dest, off)
}

func (pf *plainFile) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	defer pf.n.st.done(OpWrite, pf.n.st.now())
	return pf.LoopbackFile.Write(ctx, data, off)
}

func (pf *plainFile) Flush(ctx context.Context) syscall.Errno {
	defer pf.n.st.done(OpFlush, pf.n.st.now())
	return pf.LoopbackFile.Flush(ctx)
}

func (pf *plainFile) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	defer pf.n.st.done(OpFsync, pf.n.st.now())
	return pf.LoopbackFile.Fsync(ctx, flags)
}

func (pf *plainFile) Ioctl(ctx context.Context, cmd uint32, arg uint64, input []byte, output []byte) (int32, syscall.Errno) {
	return 0, syscall.ENOTTY
}

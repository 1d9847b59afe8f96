package fusefs

import (
	"context"
	"errors"
	"os"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// Creating files and directories: new files inside encrypted VMs are created
// as containers by the backend.

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
	c, encrypted, err := n.st.backend.Create(rel, os.FileMode(mode&0o7777))
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

package fusefs

import (
	"context"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"golang.org/x/sys/unix"
)

// Name operations: rename, link, symlink, readlink, and the operations
// passed through unchanged (statfs, directories, xattrs).

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
	if class, _, err := n.st.backend.Classify(oldRel); err != nil || class != view.FilePlain {
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

package fusefs

import (
	"path"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"

	"github.com/vmcryptd/vmcryptd/engine/container"
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
	c        *container.Container
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

package fusefs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// Open and release: the shared Container of an encrypted file (acquire,
// release), settling a file written through the view, and Open itself.

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
	if err != nil && !ro && !write && (errors.Is(err, os.ErrPermission) || errors.Is(err, syscall.EROFS) || errors.Is(err, container.ErrDegraded)) {
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
	return err == nil && class == view.FilePlain
}

// settle lets the backend give the file its final form (Backend.Settle) when es
// is its last handle: the container is synced first, so the backend
// reads what was written. Files it replaced are dropped from the view.
func (n *node) settle(es *encState) {
	s := n.st
	if es.readOnly || es.retired.Load() {
		return
	}
	rel := n.rel()
	if !s.backend.Unsettled(rel) {
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
	replaced, err := s.backend.Settle(rel, s.isOpen, unchanged)
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
	case view.FilePlain:
		return n.openPlain(rel, flags)
	case view.FileLocked:
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

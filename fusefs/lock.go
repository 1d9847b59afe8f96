package fusefs

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
)

// LockResult says what View.Lock did.
type LockResult struct {
	// Invalidated counts files whose cached pages the kernel was told to
	// drop; Sealed counts encrypted files that were open and are now
	// closed (their handles answer EACCES).
	Invalidated, Sealed int
}

// Lock makes the view forget every decrypted byte it can reach, for
// `vmcryptd lock`. The caller has already zeroed the KEKs and the
// datastore's DEK cache, so no new open can succeed (EACCES); Lock then
//
//  1. tells the kernel to drop the page cache of every regular file it
//     knows (FUSE inode invalidation): cached plaintext leaves memory,
//     and dirty pages are written back first, through containers still
//     open, so no write the kernel accepted is lost;
//  2. seals every open container (waiting for requests in flight; the
//     header is written, the per-file keys zeroed) and marks its handles
//     locked: every later read, write, fsync, seek or allocate on them
//     answers EACCES. The files must be opened again after an unlock.
//
// Errors are collected, not fatal: every container is sealed whatever
// happened to another.
func (m *View) Lock() (LockResult, error) {
	var res LockResult
	var errs []error
	if root := m.st.rootNode; root != nil {
		n, err := invalidateTree(&root.Inode)
		res.Invalidated = n
		if err != nil {
			errs = append(errs, err)
		}
	}
	m.st.mu.Lock()
	nodes := make(map[*node]bool, len(m.st.open))
	for _, n := range m.st.open {
		nodes[n] = true
	}
	m.st.mu.Unlock()
	for n := range nodes {
		n.mu.Lock()
		es := n.enc
		if es != nil {
			es.locked.Store(true)
			n.enc = nil // the next open goes to the backend, which refuses
		}
		n.mu.Unlock()
		if es == nil {
			continue
		}
		if err := es.c.Seal(); err != nil {
			errs = append(errs, fmt.Errorf("seal %s: %w", n.rel(), err))
		}
		res.Sealed++
	}
	if len(errs) > 0 {
		m.st.log.Error("lock: view not fully sealed", "mountpoint", m.mountpoint, "err", errors.Join(errs...))
	}
	m.st.log.Info("view locked", "mountpoint", m.mountpoint, "invalidated", res.Invalidated, "sealed", res.Sealed)
	return res, errors.Join(errs...)
}

// invalidateTree asks the kernel to drop the cached data of every regular
// file under dir that it has looked up. ENOENT means the kernel has
// already forgotten the inode (nothing cached).
func invalidateTree(dir *fs.Inode) (int, error) {
	n := 0
	var errs []error
	for name, ch := range dir.Children() {
		switch ch.StableAttr().Mode & syscall.S_IFMT {
		case syscall.S_IFDIR:
			k, err := invalidateTree(ch)
			n += k
			if err != nil {
				errs = append(errs, err)
			}
		case syscall.S_IFREG:
			// Offset 0, length 0: the whole file.
			if errno := ch.NotifyContent(0, 0); errno != 0 && errno != syscall.ENOENT {
				errs = append(errs, fmt.Errorf("invalidate page cache of %s: %w", name, errno))
				continue
			}
			n++
		}
	}
	return n, errors.Join(errs...)
}

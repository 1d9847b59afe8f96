package fusefs

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
)

// TestErrnoTable: each engine and OS error reaches the caller as its
// errno, wrapped or not, on the open path (errnoOf) and, where a caller
// can act on it, on the data path (ioErrno).
func TestErrnoTable(t *testing.T) {
	refused := &vm.RefusedError{Path: "vm/vm.nvram", Clause: vm.ClauseKind, Why: "holds a vswp container"}
	for _, tc := range []struct {
		err      error
		open, io syscall.Errno
	}{
		{nil, 0, syscall.EIO},
		{view.ErrBusy, syscall.EBUSY, syscall.EIO},
		{container.ErrDegraded, syscall.EROFS, syscall.EROFS},
		{refused, syscall.EACCES, syscall.EIO},
		{keys.ErrLocked, syscall.EACCES, syscall.EIO},
		{keys.ErrKeyUnavailable, syscall.EACCES, syscall.EIO},
		{view.ErrKeyLines, syscall.EPERM, syscall.EIO},
		{container.ErrTooLarge, syscall.EFBIG, syscall.EFBIG},
		{container.ErrTampered, syscall.EIO, syscall.EIO},
		{fs.ErrNotExist, syscall.ENOENT, syscall.EIO},
		{fs.ErrPermission, syscall.EACCES, syscall.EIO},
		{fs.ErrExist, syscall.EEXIST, syscall.EIO},
		{syscall.ENOSPC, syscall.ENOSPC, syscall.ENOSPC},
		{syscall.EDQUOT, syscall.EDQUOT, syscall.EDQUOT},
		{errors.New("something else"), syscall.EIO, syscall.EIO},
	} {
		for _, err := range []error{tc.err, fmt.Errorf("write vm/disk-flat.vmdk: %w", tc.err)} {
			if tc.err == nil && err != nil {
				continue
			}
			if got := errnoOf(err); got != tc.open {
				t.Errorf("errnoOf(%v) = %v, want %v", err, got, tc.open)
			}
			if tc.err == nil {
				continue
			}
			if got := ioErrno(err); got != tc.io {
				t.Errorf("ioErrno(%v) = %v, want %v", err, got, tc.io)
			}
		}
	}
}

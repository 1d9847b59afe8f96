package view

import (
	"errors"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/vmdir"
)

// roleOf gathers the facts about the file at path, whose first bytes are
// head, and asks Decide. Link count and inode come from the path.
func (d *Datastore) roleOf(path string, head []byte) vm.Role { return d.roleOfFile(path, head, nil) }

// roleOfFile is roleOf with the link count and inode taken from st, the
// fstat of the descriptor that head was read from and that will be
// served (nil: lstat the path).
func (d *Datastore) roleOfFile(path string, head []byte, st *unix.Stat_t) vm.Role {
	dir := filepath.Dir(path)
	l, err := d.Layout(dir)
	stat := func() (*unix.Stat_t, error) {
		if st != nil {
			return st, nil
		}
		var lst unix.Stat_t
		if err := unix.Lstat(path, &lst); err != nil {
			return nil, err
		}
		return &lst, nil
	}
	return vm.Decide(vm.Facts{
		Name:         filepath.Base(path),
		Head:         head,
		Layout:       l,
		LayoutErr:    err,
		CorePatterns: d.corePatterns,
		NoVMX: func() bool {
			_, ferr := vmdir.FindVMX(dir)
			return errors.Is(ferr, vmdir.ErrNoVMX)
		},
		Nlink: func() (uint64, error) {
			s, err := stat()
			if err != nil {
				return 0, err
			}
			return uint64(s.Nlink), nil
		},
		MadeByView: func(id [16]byte) bool {
			s, err := stat()
			return err == nil && d.made.has(madeKey{uint64(s.Dev), s.Ino, id})
		},
		DescribedBy: func() (*vm.Disk, bool, error) { return describedBy(l, filepath.Base(path)) },
		ExtentCopies: func(dk *vm.Disk) (keys.Binding, bool) {
			b, _, ok := vm.ExtentCopies(dir, dk)
			return b, ok
		},
	})
}

// WritableUnder refuses writes through the view to files whose DEK is in
// keySafe ks when a KEK of ks that is in memory may not wrap: new data
// must not go under a revoked (perhaps compromised) key. Such VMs are
// served read-only; the error names the key and wraps EROFS.
func (d *Datastore) WritableUnder(ks string) error {
	if ks == "" {
		return nil
	}
	entries, err := keys.DecodeKeySafe(ks)
	if err != nil {
		return nil // the unwrap that follows reports it
	}
	for _, e := range entries {
		if k, ok := d.Keys.Peek(e.KEK); ok {
			if err := k.MayWrap(); err != nil {
				return err
			}
		}
	}
	return nil
}

// writableFile is writableUnder for the keySafe that holds the DEK of a
// file of role r: the one the VM's files name, or the file's own header
// copy (core dumps, disks made through a view not yet named).
func (d *Datastore) writableFile(r vm.Role, head []byte) error {
	ks := r.KeySafe
	if ks == "" {
		ks, _ = container.ReadEmbeddedKeySafe(head)
	}
	return d.WritableUnder(ks)
}

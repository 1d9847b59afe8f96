package engine

import (
	"errors"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/formats/vmdir"
)

// roleOf gathers the facts about the file at path, whose first bytes are
// head, and asks decideTrust. Link count and inode come from the path.
func (d *Datastore) roleOf(path string, head []byte) role { return d.roleOfFile(path, head, nil) }

// roleOfFile is roleOf with the link count and inode taken from st, the
// fstat of the descriptor that head was read from and that will be
// served (nil: lstat the path).
func (d *Datastore) roleOfFile(path string, head []byte, st *unix.Stat_t) role {
	dir := filepath.Dir(path)
	l, err := d.layout(dir)
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
	return decideTrust(trustFacts{
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
		DescribedBy: func() (*disk, bool, error) { return describedBy(l, filepath.Base(path)) },
		ExtentCopies: func(dk *disk) (Binding, bool) {
			b, _, ok := extentCopies(dir, dk)
			return b, ok
		},
	})
}

// writableUnder refuses writes through the view to files whose DEK is in
// keySafe ks when a KEK of ks that is in memory may not wrap: new data
// must not go under a revoked (perhaps compromised) key. Such VMs are
// served read-only; the error names the key and wraps EROFS.
func (d *Datastore) writableUnder(ks string) error {
	if ks == "" {
		return nil
	}
	entries, err := DecodeKeySafe(ks)
	if err != nil {
		return nil // the unwrap that follows reports it
	}
	for _, e := range entries {
		if k, ok := d.keys.Peek(e.KEK); ok {
			if err := k.mayWrap(); err != nil {
				return err
			}
		}
	}
	return nil
}

// writableFile is writableUnder for the keySafe that holds the DEK of a
// file of role r: the one the VM's files name, or the file's own header
// copy (core dumps, disks made through a view not yet named).
func (d *Datastore) writableFile(r role, head []byte) error {
	ks := r.ks
	if ks == "" {
		ks, _ = ReadEmbeddedKeySafe(head)
	}
	return d.writableUnder(ks)
}

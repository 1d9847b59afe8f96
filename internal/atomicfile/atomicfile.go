// Package atomicfile replaces small files crash-safely: write a temporary
// file in the same directory, fsync it, rename it over the target, fsync
// the directory. A reader sees the old or the new content, never a mix.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// Write atomically replaces path with data, created with perm.
func Write(path string, data []byte, perm os.FileMode) error {
	return WriteAs(path, data, perm, -1, -1)
}

// WriteAs is Write with the new file owned by uid:gid (-1 keeps the
// creator's), set before the rename so the file never appears with the
// wrong owner, even after a crash.
func WriteAs(path string, data []byte, perm os.FileMode, uid, gid int) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return finish(f, path, data, perm, uid, gid)
}

// WriteVia is Write through the temporary file tmp, which the caller
// named (and may have recorded, to clean up after a crash): it is created
// with O_EXCL|O_NOFOLLOW, so it never writes over or through an existing
// file.
func WriteVia(tmp, path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return finish(f, path, data, perm, -1, -1)
}

// finish writes data to the new temporary file f, makes it durable,
// renames it over path and makes the rename durable; on failure it
// removes f.
func finish(f *os.File, path string, data []byte, perm os.FileMode, uid, gid int) error {
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if uid >= 0 || gid >= 0 {
		if err := f.Chown(uid, gid); err != nil {
			return fmt.Errorf("write %s: chown: %w", path, err)
		}
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write %s: fsync: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	ok = true
	return SyncDir(filepath.Dir(path))
}

// SyncDir fsyncs a directory so a rename or create in it is durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync dir %s: %w", dir, err)
	}
	return nil
}

// Package safeopen is the one way vmcryptd opens a file of a datastore.
//
// A VM directory is written by people and guests vmcryptd does not trust:
// a FIFO in place of an extent would make a plain open(2) block forever
// (holding a VM lock, stalling a view or the daemon), a device node could
// be read without end, and a symlink could lead outside the datastore.
// Open therefore opens with O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC|O_NOCTTY, so
// no open can block and no symlink is followed, checks the type of what it
// opened from the same descriptor (fstat: no window between check and
// use), refuses everything but a regular file with an error naming the
// path and its type, and only then clears O_NONBLOCK.
package safeopen

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// ErrNotRegular is matched (errors.Is) by every refusal of a file that is
// not a regular file.
var ErrNotRegular = errors.New("not a regular file")

// NotRegularError refuses a file that is not a regular file. Its message
// is one line: "PATH: is a FIFO, not a regular file".
type NotRegularError struct {
	Path string
	Type string // "a FIFO", "a socket", "a symlink", ...
}

func (e *NotRegularError) Error() string {
	return fmt.Sprintf("%s: is %s, not a regular file", e.Path, e.Type)
}

// Is makes errors.Is(err, ErrNotRegular) true.
func (e *NotRegularError) Is(target error) bool { return target == ErrNotRegular }

// TooLargeError refuses a file larger than a reader's bound.
type TooLargeError struct {
	Path  string
	Limit int64
}

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("%s: larger than %d bytes", e.Path, e.Limit)
}

// typeName names the file type in mode (the S_IFMT bits of st_mode).
func typeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "a regular file"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFLNK:
		return "a symlink"
	}
	return fmt.Sprintf("of unknown type %#o", mode&unix.S_IFMT)
}

// Check is the decision: nil for a regular file, otherwise the refusal
// naming path and the type st_mode says it has.
func Check(path string, mode uint32) error {
	if mode&unix.S_IFMT == unix.S_IFREG {
		return nil
	}
	return &NotRegularError{Path: path, Type: typeName(mode)}
}

// OpenFD opens path with flag (and perm, for O_CREAT) as Open does and
// returns the raw descriptor, for callers that hand it on (the FUSE
// view's plain files). The caller closes it.
func OpenFD(path string, flag int, perm uint32) (int, error) {
	fd, err := openNoBlock(path, flag, perm)
	if err != nil {
		return -1, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if err := Check(path, st.Mode); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if flag&unix.O_NONBLOCK == 0 {
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err == nil {
			_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_NONBLOCK)
		}
		if err != nil {
			unix.Close(fd)
			return -1, &os.PathError{Op: "fcntl", Path: path, Err: err}
		}
	}
	return fd, nil
}

// openNoBlock is the open(2) itself. A symlink at path fails with ELOOP
// under O_NOFOLLOW; that is reported as a symlink refusal.
func openNoBlock(path string, flag int, perm uint32) (int, error) {
	for {
		fd, err := unix.Open(path, flag|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, perm)
		if err == unix.EINTR {
			continue
		}
		if err == unix.ELOOP {
			var st unix.Stat_t
			if unix.Lstat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
				return -1, &NotRegularError{Path: path, Type: "a symlink"}
			}
		}
		if err == unix.ENXIO {
			// O_WRONLY|O_NONBLOCK on a FIFO without a reader (or a
			// device without its driver): say what it is if we can.
			var st unix.Stat_t
			if unix.Lstat(path, &st) == nil {
				if cerr := Check(path, st.Mode); cerr != nil {
					return -1, cerr
				}
			}
		}
		if err != nil {
			return -1, &os.PathError{Op: "open", Path: path, Err: err}
		}
		return fd, nil
	}
}

// OpenFile opens path, which must be a regular file (never a symlink to
// one), with flag and perm (for O_CREAT). It never blocks on a FIFO or a
// device.
func OpenFile(path string, flag int, perm os.FileMode) (*os.File, error) {
	fd, err := OpenFD(path, flag, uint32(perm.Perm()))
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), path), nil
}

// Open opens the regular file at path with flag (os.O_RDONLY, os.O_RDWR,
// ...).
func Open(path string, flag int) (*os.File, error) {
	return OpenFile(path, flag, 0)
}

// ReadFile reads the whole regular file at path, refusing (TooLargeError)
// one larger than limit bytes, so a huge or sparse file named by a hostile
// VM directory is never read into memory.
func ReadFile(path string, limit int64) ([]byte, error) {
	f, err := Open(path, os.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > limit {
		return nil, &TooLargeError{Path: path, Limit: limit}
	}
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(b)) > limit {
		return nil, &TooLargeError{Path: path, Limit: limit}
	}
	return b, nil
}

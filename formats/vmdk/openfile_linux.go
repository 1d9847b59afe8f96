package vmdk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// OpenIn opens name, a path relative to dir, read-only for a parser of
// untrusted files: the open never follows a symbolic link (in any
// component of name) and never leaves dir (openat2 RESOLVE_BENEATH |
// RESOLVE_NO_SYMLINKS), never blocks (O_NONBLOCK: a FIFO does not wait
// for a writer), and the type is checked on the opened descriptor: only a
// regular file is returned; a FIFO, socket, device, directory or symlink
// is refused with an error naming it. dir itself is opened as given.
func OpenIn(dir, name string) (*os.File, os.FileInfo, error) {
	path := filepath.Join(dir, name)
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(dfd)
	how := unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_NOCTTY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	var fd int
	for {
		fd, err = unix.Openat2(dfd, name, &how)
		if err != unix.EINTR {
			break
		}
	}
	switch {
	case errors.Is(err, unix.ELOOP):
		return nil, nil, fmt.Errorf("%s: is a symbolic link (or passes through one); not followed", path)
	case errors.Is(err, unix.ENXIO):
		// A socket (or a device without a driver) cannot be opened at
		// all; name its type for the message only.
		what := "of another type"
		var st unix.Stat_t
		if unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
			what = nonRegular(st.Mode)
		}
		return nil, nil, fmt.Errorf("%s: is %s, not a regular file; not read", path, what)
	case errors.Is(err, unix.EXDEV):
		return nil, nil, fmt.Errorf("%s: leads outside %s; not opened", path, dir)
	case err != nil:
		return nil, nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if what := nonRegular(st.Mode); what != "" {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("%s: is %s, not a regular file; not read", path, what)
	}
	// Back to blocking mode so that reads go through the usual path (a
	// regular file never blocks on O_NONBLOCK anyway).
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, nil, &os.PathError{Op: "fcntl", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, info, nil
}

// OpenRegular is OpenIn(filepath.Dir(path), filepath.Base(path)): it
// opens the file path names, refusing a symbolic link, a FIFO, a socket,
// a device or a directory without blocking on any of them.
func OpenRegular(path string) (*os.File, os.FileInfo, error) {
	return OpenIn(filepath.Dir(path), filepath.Base(path))
}

// ReadRegular reads the whole file at path (opened as OpenRegular does)
// if it holds at most max bytes; a larger file is an error naming it and
// is not read.
func ReadRegular(path string, max int64) ([]byte, error) {
	f, info, err := OpenRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if info.Size() > max {
		return nil, fmt.Errorf("%s: %d bytes exceeds the limit of %d for this kind of file; not read", path, info.Size(), max)
	}
	// One buffer of the size fstat gave, and one byte more to notice a
	// file that grew meanwhile.
	b := make([]byte, info.Size()+1)
	n, err := io.ReadFull(f, b)
	switch {
	case err == nil:
		return nil, fmt.Errorf("%s: grew while read; not read", path)
	case err != io.ErrUnexpectedEOF && err != io.EOF:
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b[:n], nil
}

// ReadHead reads up to n leading bytes of the file at path (opened as
// OpenRegular does).
func ReadHead(path string, n int) ([]byte, error) {
	f, _, err := OpenRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	k, err := io.ReadFull(f, b)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b[:k], nil
}

// nonRegular names the file type of mode unless it is a regular file.
func nonRegular(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return ""
	case unix.S_IFIFO:
		return "a FIFO (named pipe)"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return "not a regular file"
}

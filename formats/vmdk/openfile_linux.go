package vmdk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

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
	fd, err := openBeneath(dfd, name, &how, true)
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

// openBeneath opens name under dfd as openat2(2) with how does. Where
// openat2 is not available (ENOSYS: kernels before 5.6, and seccomp
// filters that cannot inspect its arguments, such as systemd's
// RestrictSUIDSGID= or container runtimes' default profiles), or when
// useOpenat2 is false (tests), it walks name one component at a time
// with openat(2) and O_NOFOLLOW from dfd, refusing "..", absolute names
// and any symbolic link with the errors openat2 gives: EXDEV for a name
// that would leave dfd, ELOOP for a symlink.
func openBeneath(dfd int, name string, how *unix.OpenHow, useOpenat2 bool) (int, error) {
	retry := func(f func() (int, error)) (int, error) {
		for {
			fd, err := f()
			if err != unix.EINTR {
				return fd, err
			}
		}
	}
	if useOpenat2 {
		fd, err := retry(func() (int, error) { return unix.Openat2(dfd, name, how) })
		if err != unix.ENOSYS {
			return fd, err
		}
	}
	if name == "" || filepath.IsAbs(name) {
		return -1, unix.EXDEV
	}
	// Not cleaned: "a/../b" would drop a component that may be a
	// symlink. Every ".." is refused (stricter than openat2, which allows
	// one that stays beneath).
	var parts []string
	for _, p := range strings.Split(name, "/") {
		if p != "" && p != "." {
			parts = append(parts, p)
		}
	}
	if len(parts) == 0 {
		parts = []string{"."}
	}
	cur := dfd
	defer func() {
		if cur != dfd {
			unix.Close(cur)
		}
	}()
	for i, p := range parts {
		if p == ".." {
			return -1, unix.EXDEV
		}
		flags := int(how.Flags) | unix.O_NOFOLLOW
		if i < len(parts)-1 {
			flags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
		}
		fd, err := retry(func() (int, error) { return unix.Openat(cur, p, flags, uint32(how.Mode)) })
		if err == unix.ENOTDIR && i < len(parts)-1 {
			// O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR.
			var st unix.Stat_t
			if unix.Fstatat(cur, p, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
				err = unix.ELOOP
			}
		}
		if err != nil {
			return -1, err
		}
		if cur != dfd {
			unix.Close(cur)
		}
		cur = fd
	}
	fd := cur
	cur = dfd // not closed by the defer: it is the result
	return fd, nil
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

package vmdk

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestNonRegular(t *testing.T) {
	for _, tc := range []struct {
		mode uint32
		want string
	}{
		{unix.S_IFREG | 0o644, ""},
		{unix.S_IFIFO | 0o644, "a FIFO (named pipe)"},
		{unix.S_IFSOCK, "a socket"},
		{unix.S_IFCHR, "a character device"},
		{unix.S_IFBLK, "a block device"},
		{unix.S_IFDIR | 0o755, "a directory"},
		{unix.S_IFLNK, "a symbolic link"},
		{0, "not a regular file"},
	} {
		if got := nonRegular(tc.mode); got != tc.want {
			t.Errorf("nonRegular(%o) = %q, want %q", tc.mode, got, tc.want)
		}
	}
}

// TestOpenInRefuses opens real files of every kind: only the regular file
// opens; nothing blocks (a FIFO without writer would block a plain open).
func TestOpenInRefuses(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("data"), 0o644)
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "g"), []byte("data"), 0o644)
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Symlink("f", filepath.Join(dir, "link"))
	os.Symlink("sub", filepath.Join(dir, "sublink"))
	l, err := net.Listen("unix", filepath.Join(dir, "sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, tc := range []struct{ name, err string }{
		{"f", ""},
		{"sub/g", ""},
		{"fifo", "is a FIFO (named pipe), not a regular file"},
		{"sock", "is a socket, not a regular file"},
		{"sub", "is a directory, not a regular file"},
		{"link", "is a symbolic link"},
		{"sublink/g", "is a symbolic link"},
		{"../" + filepath.Base(dir) + "/f", "leads outside"},
		{"missing", "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			f, _, err := OpenIn(dir, tc.name)
			if time.Since(start) > time.Second {
				t.Errorf("took %v", time.Since(start))
			}
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				b := make([]byte, 4)
				if _, err := f.ReadAt(b, 0); err != nil || string(b) != "data" {
					t.Errorf("read %q %v", b, err)
				}
				f.Close()
				return
			}
			if err == nil {
				f.Close()
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), filepath.Join(dir, tc.name)) || strings.Contains(err.Error(), "\n") {
				t.Errorf("err = %v, want one line naming the file with %q", err, tc.err)
			}
		})
	}
	if _, err := ReadRegular(filepath.Join(dir, "f"), 3); err == nil || !strings.Contains(err.Error(), "exceeds the limit") {
		t.Errorf("ReadRegular over the limit: %v", err)
	}
	if b, err := ReadRegular(filepath.Join(dir, "f"), 4); err != nil || string(b) != "data" {
		t.Errorf("ReadRegular: %q %v", b, err)
	}
}

package safeopen

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestCheck(t *testing.T) {
	tests := []struct {
		mode uint32
		want string // "" means accepted
	}{
		{unix.S_IFREG | 0o644, ""},
		{unix.S_IFREG, ""},
		{unix.S_IFIFO | 0o644, "p: is a FIFO, not a regular file"},
		{unix.S_IFSOCK | 0o755, "p: is a socket, not a regular file"},
		{unix.S_IFCHR | 0o666, "p: is a character device, not a regular file"},
		{unix.S_IFBLK | 0o660, "p: is a block device, not a regular file"},
		{unix.S_IFDIR | 0o755, "p: is a directory, not a regular file"},
		{unix.S_IFLNK | 0o777, "p: is a symlink, not a regular file"},
		{0, "p: is of unknown type 0, not a regular file"},
	}
	for _, tt := range tests {
		err := Check("p", tt.mode)
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("Check(%#o) = %v, want nil", tt.mode, err)
		case tt.want != "" && (err == nil || err.Error() != tt.want):
			t.Errorf("Check(%#o) = %v, want %q", tt.mode, err, tt.want)
		case tt.want != "" && !errors.Is(err, ErrNotRegular):
			t.Errorf("Check(%#o) = %v, does not match ErrNotRegular", tt.mode, err)
		}
	}
}

// TestOpen opens every kind of file a hostile VM directory can hold. None
// may block (a plain open of a FIFO would wait for a writer forever),
// only regular files are opened, and every refusal is one line naming the
// path and its type.
func TestOpen(t *testing.T) {
	dir := t.TempDir()
	reg := filepath.Join(dir, "disk-flat.vmdk")
	if err := os.WriteFile(reg, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo.nvram")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock.vmdk")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	link := filepath.Join(dir, "link.vmdk")
	if err := os.Symlink(reg, link); err != nil {
		t.Fatal(err)
	}
	linkFIFO := filepath.Join(dir, "linkfifo.vmdk")
	if err := os.Symlink(fifo, linkFIFO); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		path string
		flag int
		want string // substring of the error; "" means it opens
	}{
		{"regular", reg, os.O_RDONLY, ""},
		{"regular rw", reg, os.O_RDWR, ""},
		{"fifo", fifo, os.O_RDONLY, fifo + ": is a FIFO, not a regular file"},
		{"fifo rw", fifo, os.O_RDWR, fifo + ": is a FIFO, not a regular file"},
		{"fifo write-only, no reader", fifo, os.O_WRONLY, fifo + ": is a FIFO, not a regular file"},
		{"socket", sock, os.O_RDONLY, sock + ": is a socket, not a regular file"},
		{"char device", "/dev/null", os.O_RDONLY, "/dev/null: is a character device, not a regular file"},
		{"symlink", link, os.O_RDONLY, link + ": is a symlink, not a regular file"},
		{"symlink to fifo", linkFIFO, os.O_RDONLY, linkFIFO + ": is a symlink, not a regular file"},
		{"directory", sub, os.O_RDONLY, sub + ": is a directory, not a regular file"},
		{"missing", filepath.Join(dir, "none"), os.O_RDONLY, "no such file or directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			type result struct {
				f   *os.File
				err error
			}
			done := make(chan result, 1)
			go func() {
				f, err := Open(tt.path, tt.flag)
				done <- result{f, err}
			}()
			var r result
			select {
			case r = <-done:
			case <-time.After(2 * time.Second):
				t.Fatalf("Open(%s) blocked", tt.path)
			}
			if tt.want == "" {
				if r.err != nil {
					t.Fatalf("Open(%s) = %v", tt.path, r.err)
				}
				defer r.f.Close()
				fl, err := unix.FcntlInt(r.f.Fd(), unix.F_GETFL, 0)
				if err != nil {
					t.Fatal(err)
				}
				if fl&unix.O_NONBLOCK != 0 {
					t.Errorf("O_NONBLOCK still set on %s", tt.path)
				}
				if fd, _ := unix.FcntlInt(r.f.Fd(), unix.F_GETFD, 0); fd&unix.FD_CLOEXEC == 0 {
					t.Errorf("FD_CLOEXEC not set on %s", tt.path)
				}
				b := make([]byte, 4)
				if _, err := r.f.ReadAt(b, 0); err != nil || string(b) != "data" {
					t.Errorf("read %q, %v", b, err)
				}
				return
			}
			if r.err == nil {
				r.f.Close()
				t.Fatalf("Open(%s) opened it; want %q", tt.path, tt.want)
			}
			if !strings.Contains(r.err.Error(), tt.want) || strings.Contains(r.err.Error(), "\n") {
				t.Errorf("Open(%s) = %q, want one line containing %q", tt.path, r.err, tt.want)
			}
		})
	}
}

func TestOpenFileCreate(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "new.nvram")
	f, err := OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600); !errors.Is(err, os.ErrExist) {
		t.Fatalf("second O_EXCL create: %v, want EEXIST", err)
	}
	fifo := filepath.Join(dir, "f")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenFile(fifo, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600); !errors.Is(err, ErrNotRegular) {
		t.Fatalf("O_CREAT over a FIFO: %v, want ErrNotRegular", err)
	}
}

func TestReadFile(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "a.vmx")
	if err := os.WriteFile(small, []byte("x = \"1\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sparse := filepath.Join(dir, "huge.vmx")
	if err := os.WriteFile(sparse, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(sparse, 1<<40); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "f.vmx")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		path  string
		limit int64
		want  string // error substring; "" means success
	}{
		{small, 1 << 20, ""},
		{small, 8, ""},
		{small, 7, small + ": larger than 7 bytes"},
		{sparse, 1 << 20, sparse + ": larger than 1048576 bytes"},
		{fifo, 1 << 20, fifo + ": is a FIFO, not a regular file"},
	}
	for _, tt := range tests {
		b, err := ReadFile(tt.path, tt.limit)
		if tt.want == "" {
			if err != nil || string(b) != "x = \"1\"\n" {
				t.Errorf("ReadFile(%s, %d) = %q, %v", tt.path, tt.limit, b, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ReadFile(%s, %d) = %v, want %q", tt.path, tt.limit, err, tt.want)
		}
	}
}

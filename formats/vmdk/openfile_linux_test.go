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

// TestOpenBeneathFallbackAgrees: where openat2 is refused (ENOSYS under
// systemd's RestrictSUIDSGID= and container seccomp profiles), the
// component walk opens the same files and refuses the same names with
// the same errors; and the fallback itself never blocks on a FIFO.
func TestOpenBeneathFallbackAgrees(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("data"), 0o644)
	os.MkdirAll(filepath.Join(dir, "sub", "deeper"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "deeper", "g"), []byte("data"), 0o644)
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Symlink("f", filepath.Join(dir, "link"))
	os.Symlink("sub", filepath.Join(dir, "sublink"))
	os.Symlink("deeper", filepath.Join(dir, "sub", "dl"))
	os.Symlink("/etc/passwd", filepath.Join(dir, "abslink"))
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dfd)
	how := unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_NOCTTY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	ident := func(fd int) uint64 {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	for _, tc := range []struct {
		name     string
		want     error // nil: opens
		fallback error // when it differs: the walk refuses every ".."
	}{
		{"f", nil, nil},
		{"sub/deeper/g", nil, nil},
		{"./sub//deeper/g", nil, nil},
		{"fifo", nil, nil}, // opened (O_NONBLOCK), refused by OpenIn's type check
		{"sub", nil, nil},
		{"link", unix.ELOOP, nil},
		{"sublink/deeper/g", unix.ELOOP, nil},
		{"sub/dl/g", unix.ELOOP, nil},
		{"abslink", unix.ELOOP, nil},
		{"../" + filepath.Base(dir) + "/f", unix.EXDEV, nil},
		{"sub/../f", nil, unix.EXDEV},
		{"sublink/../f", unix.ELOOP, nil},
		{"/etc/passwd", unix.EXDEV, nil},
		{"missing", unix.ENOENT, nil},
		{"f/x", unix.ENOTDIR, nil},
	} {
		a, aerr := openBeneath(dfd, tc.name, &how, true)
		b, berr := openBeneath(dfd, tc.name, &how, false)
		wantB := tc.want
		if tc.fallback != nil {
			wantB = tc.fallback
		}
		if aerr != tc.want || berr != wantB {
			t.Errorf("%s: openat2 %v, fallback %v, want %v, %v", tc.name, aerr, berr, tc.want, wantB)
		}
		if aerr == nil && berr == nil && ident(a) != ident(b) {
			t.Errorf("%s: openat2 and fallback opened different files", tc.name)
		}
		for _, fd := range []int{a, b} {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	}
}

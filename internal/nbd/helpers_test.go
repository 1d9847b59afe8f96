package nbd

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// fileBackend serves a sparse file: holes come from SEEK_DATA/SEEK_HOLE,
// trim and zero punch holes.
type fileBackend struct {
	f  *os.File
	ro bool
}

func (b *fileBackend) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b *fileBackend) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b *fileBackend) Flush() error                             { return unix.Fdatasync(int(b.f.Fd())) }
func (b *fileBackend) Trim(off, n int64) error                  { return b.Zero(off, n, true) }
func (b *fileBackend) Zero(off, n int64, punch bool) error {
	return unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
func (b *fileBackend) ReadOnly() bool { return b.ro }
func (b *fileBackend) Size() int64 {
	st, err := b.f.Stat()
	if err != nil {
		return 0
	}
	return st.Size()
}

func (b *fileBackend) Extents(off, n int64) ([]Extent, error) {
	fd := int(b.f.Fd())
	end := off + n
	var out []Extent
	for pos := off; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			data = end
		} else if err != nil {
			return nil, err
		}
		if data > pos {
			out = append(out, Extent{min(data, end) - pos, StateHole | StateZero})
			pos = min(data, end)
			continue
		}
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		out = append(out, Extent{min(hole, end) - pos, 0})
		pos = min(hole, end)
	}
	return out, nil
}

// memBackend is a small in-memory disk for the fuzz target.
type memBackend struct {
	mu sync.Mutex
	b  []byte
}

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.b[off:]), nil
}
func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.b[off:], p), nil
}
func (m *memBackend) Flush() error            { return nil }
func (m *memBackend) Trim(off, n int64) error { return m.Zero(off, n, true) }
func (m *memBackend) Zero(off, n int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}
func (m *memBackend) Extents(off, n int64) ([]Extent, error) {
	return []Extent{{n / 2, 0}, {n - n/2, StateZero}}, nil
}
func (m *memBackend) Size() int64    { return int64(len(m.b)) }
func (m *memBackend) ReadOnly() bool { return false }

// requireTool fails under CI=true and skips otherwise when a peer tool is
// missing.
func requireTool(t testing.TB, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s not installed (scripts/install-deps.sh installs it)", name)
			}
			t.Skipf("%s not installed", name)
		}
	}
}

// serveUnix serves b on a unix socket in a temp dir until the test ends.
func serveUnix(t *testing.T, cfg Config) (*Server, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(cfg)
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, sock
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

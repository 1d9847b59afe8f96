package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// model is the expected content of one file.
type model struct{ b []byte }

func (m *model) write(off int64, p []byte) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
	}
	copy(m.b[off:], p)
}

func (m *model) truncate(n int64) {
	if n <= int64(len(m.b)) {
		m.b = m.b[:n]
		return
	}
	m.b = append(m.b, make([]byte, n-int64(len(m.b)))...)
}

func (m *model) zero(off, n int64) {
	end := min(off+n, int64(len(m.b)))
	if off < end {
		clear(m.b[off:end])
	}
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// checkFile compares the whole file (through f) and its size with m.
func checkFile(t *testing.T, f *os.File, m *model, what string) {
	t.Helper()
	st, err := f.Stat()
	if err != nil {
		t.Fatalf("%s: stat: %v", what, err)
	}
	if st.Size() != int64(len(m.b)) {
		t.Fatalf("%s: size %d, want %d", what, st.Size(), len(m.b))
	}
	got := make([]byte, len(m.b)+100)
	n, err := f.ReadAt(got, 0)
	if err != nil && err != io.EOF {
		t.Fatalf("%s: read: %v", what, err)
	}
	if n != len(m.b) {
		t.Fatalf("%s: read %d bytes, want %d", what, n, len(m.b))
	}
	if i := firstDiff(got[:n], m.b); i >= 0 {
		t.Fatalf("%s: content differs at byte %d (got %#x, want %#x)", what, i, got[i], m.b[i])
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// checkAtRest reads the backing file directly: a plain file must hold the
// model as is, an encrypted one must be a container that the engine
// decrypts to the model (and that does not hold the plaintext).
func checkAtRest(t *testing.T, m *testMount, rel string, enc bool, want *model) {
	t.Helper()
	if !enc {
		raw, err := os.ReadFile(m.backing(rel))
		if err != nil {
			t.Fatal(err)
		}
		if i := firstDiff(raw, want.b); i >= 0 {
			t.Fatalf("backing %s differs from the model at byte %d (len %d, want %d)", rel, i, len(raw), len(want.b))
		}
		return
	}
	c, err := container.OpenContainer(m.backing(rel), m.b.dek, true, "")
	if err != nil {
		t.Fatalf("backing %s: %v", rel, err)
	}
	defer c.Close()
	if c.Size() != int64(len(want.b)) {
		t.Fatalf("container %s: logical size %d, want %d", rel, c.Size(), len(want.b))
	}
	got := make([]byte, len(want.b))
	if _, err := c.ReadAt(got, 0); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	if i := firstDiff(got, want.b); i >= 0 {
		t.Fatalf("container %s decrypts differently from the model at byte %d", rel, i)
	}
	if len(want.b) >= 64 {
		raw, _ := os.ReadFile(m.backing(rel))
		// A 64-byte window of non-zero plaintext must not be at rest.
		for off := 0; off+64 <= len(want.b); off += 4096 {
			w := want.b[off : off+64]
			if !isAllZero(w) && bytes.Contains(raw, w) {
				t.Fatalf("plaintext of %s at offset %d found in the backing file", rel, off)
			}
		}
	}
}

func isAllZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

type fileCase struct {
	name string
	run  func(t *testing.T, m *testMount, rel string, enc bool) *model
}

var fileCases = []fileCase{
	{"odd-writes", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		r := rand.New(rand.NewPCG(1, 2))
		f, err := os.OpenFile(m.view(rel), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		var md model
		ops := []struct{ off, n int64 }{
			{0, 1}, {1, 510}, {511, 2}, {4095, 2}, {4097, 4095}, {10000, 1}, {7, 12345},
			{65535, 65537}, {3 << 20, 1<<20 + 3}, {100, 1 << 20}, {5<<20 - 1, 1}, {8191, 8193},
		}
		for _, op := range ops {
			p := randBytes(r, int(op.n))
			if _, err := f.WriteAt(p, op.off); err != nil {
				t.Fatalf("write [%d,+%d): %v", op.off, op.n, err)
			}
			md.write(op.off, p)
			// Read a window around the write back at once.
			lo := max(op.off-5000, 0)
			hi := min(op.off+op.n+5000, int64(len(md.b)))
			got := make([]byte, hi-lo)
			if _, err := f.ReadAt(got, lo); err != nil && err != io.EOF {
				t.Fatalf("read [%d,%d): %v", lo, hi, err)
			}
			if i := firstDiff(got, md.b[lo:hi]); i >= 0 {
				t.Fatalf("after write [%d,+%d): byte %d differs", op.off, op.n, lo+int64(i))
			}
		}
		checkFile(t, f, &md, "odd writes")
		return &md
	}},
	{"truncate", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		r := rand.New(rand.NewPCG(3, 4))
		var md model
		f, err := os.OpenFile(m.view(rel), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		p := randBytes(r, 3*4096+100)
		f.WriteAt(p, 0)
		md.write(0, p)
		for _, size := range []int64{5000, 20000, 4096, 4095, 1 << 20, 7, 0, 9000} {
			if err := f.Truncate(size); err != nil {
				t.Fatalf("ftruncate %d: %v", size, err)
			}
			md.truncate(size)
			checkFile(t, f, &md, fmt.Sprintf("after ftruncate %d", size))
			q := randBytes(r, 300)
			f.WriteAt(q, size/2)
			md.write(size/2, q)
		}
		// By path, with the file open and closed.
		if err := os.Truncate(m.view(rel), 6000); err != nil {
			t.Fatal(err)
		}
		md.truncate(6000)
		checkFile(t, f, &md, "after truncate(path)")
		f.Close()
		if err := os.Truncate(m.view(rel), 12345); err != nil {
			t.Fatal(err)
		}
		md.truncate(12345)
		if st, err := os.Stat(m.view(rel)); err != nil || st.Size() != 12345 {
			t.Fatalf("stat after truncate of a closed file: %v %v", st, err)
		}
		return &md
	}},
	{"append", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		r := rand.New(rand.NewPCG(5, 6))
		var md model
		first := randBytes(r, 1000)
		if err := os.WriteFile(m.view(rel), first, 0o644); err != nil {
			t.Fatal(err)
		}
		md.write(0, first)
		f, err := os.OpenFile(m.view(rel), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range []int{1, 4095, 5000, 1 << 20, 3, 4096} {
			p := randBytes(r, n)
			if _, err := f.Write(p); err != nil {
				t.Fatal(err)
			}
			md.write(int64(len(md.b)), p)
		}
		f.Close()
		// A second appender sees the new end.
		f, err = os.OpenFile(m.view(rel), os.O_RDWR|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		p := randBytes(r, 77)
		f.Write(p)
		md.write(int64(len(md.b)), p)
		checkFile(t, f, &md, "append")
		return &md
	}},
	{"punch-hole", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		r := rand.New(rand.NewPCG(7, 8))
		var md model
		f, err := os.OpenFile(m.view(rel), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		p := randBytes(r, 256<<10)
		f.WriteAt(p, 0)
		md.write(0, p)
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		before := blocks(t, m.backing(rel))
		for _, h := range []struct{ off, n int64 }{{3*4096 + 17, 40960}, {100 << 10, 64 << 10}, {5, 10}, {250 << 10, 100 << 10}} {
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, h.off, h.n); err != nil {
				t.Fatalf("punch [%d,+%d): %v", h.off, h.n, err)
			}
			md.zero(h.off, h.n)
			checkFile(t, f, &md, fmt.Sprintf("after punching [%d,+%d)", h.off, h.n))
		}
		f.Sync()
		if after := blocks(t, m.backing(rel)); after >= before {
			t.Errorf("punching freed nothing in the backing file (%d -> %d blocks)", before, after)
		}
		return &md
	}},
	{"zero-range-and-allocate", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		r := rand.New(rand.NewPCG(9, 10))
		var md model
		f, err := os.OpenFile(m.view(rel), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		p := randBytes(r, 50000)
		f.WriteAt(p, 0)
		md.write(0, p)
		// mode 0 extends.
		if err := unix.Fallocate(int(f.Fd()), 0, 40000, 100000); err != nil {
			t.Fatalf("fallocate: %v", err)
		}
		md.truncate(140000)
		checkFile(t, f, &md, "after fallocate mode 0")
		// KEEP_SIZE past the end does not change the size.
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, 100000, 100000); err != nil {
			t.Fatalf("fallocate keep size: %v", err)
		}
		checkFile(t, f, &md, "after fallocate KEEP_SIZE")
		// ZERO_RANGE inside, then one that extends.
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 1000, 20000); err != nil {
			if errors.Is(err, syscall.EOPNOTSUPP) && !enc {
				return &md // the backing file system lacks it; not ours to test
			}
			t.Fatalf("zero range: %v", err)
		}
		md.zero(1000, 20000)
		checkFile(t, f, &md, "after zero range")
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 130000, 30000); err != nil {
			t.Fatalf("zero range extending: %v", err)
		}
		md.zero(130000, 30000)
		md.truncate(160000)
		checkFile(t, f, &md, "after extending zero range")
		q := randBytes(r, 5000)
		f.WriteAt(q, 150000)
		md.write(150000, q)
		checkFile(t, f, &md, "after write into allocated range")
		return &md
	}},
	{"seek-data-hole", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		r := rand.New(rand.NewPCG(11, 12))
		var md model
		f, err := os.OpenFile(m.view(rel), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		const size = 1 << 20
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		md.truncate(size)
		for _, w := range []struct{ off, n int64 }{{0, 8192}, {512 << 10, 4096}} {
			p := randBytes(r, int(w.n))
			f.WriteAt(p, w.off)
			md.write(w.off, p)
		}
		// No fsync: the view must see data the kernel still holds dirty.
		fd := int(f.Fd())
		seek := func(off int64, whence int) (int64, error) { return unix.Seek(fd, off, whence) }
		for _, c := range []struct {
			off    int64
			whence int
			want   int64 // -1: ENXIO
		}{
			{0, unix.SEEK_DATA, 0},
			{0, unix.SEEK_HOLE, 8192},
			{100, unix.SEEK_HOLE, 8192},
			{8192, unix.SEEK_DATA, 512 << 10},
			{9000, unix.SEEK_DATA, 512 << 10},
			{512 << 10, unix.SEEK_HOLE, 512<<10 + 4096},
			{512<<10 + 4096, unix.SEEK_DATA, -1},
			{600 << 10, unix.SEEK_HOLE, 600 << 10},
			{size, unix.SEEK_DATA, -1},
			{size, unix.SEEK_HOLE, -1},
		} {
			got, err := seek(c.off, c.whence)
			name := map[int]string{unix.SEEK_DATA: "SEEK_DATA", unix.SEEK_HOLE: "SEEK_HOLE"}[c.whence]
			if c.want == -1 {
				if !errors.Is(err, syscall.ENXIO) {
					t.Errorf("%s(%d) = %d, %v; want ENXIO", name, c.off, got, err)
				}
				continue
			}
			if err != nil || got != c.want {
				t.Errorf("%s(%d) = %d, %v; want %d", name, c.off, got, err, c.want)
			}
		}
		checkFile(t, f, &md, "sparse file")
		return &md
	}},
	{"rename-open", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		r := rand.New(rand.NewPCG(13, 14))
		var md model
		f, err := os.OpenFile(m.view(rel+".old"), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		p := randBytes(r, 10000)
		f.WriteAt(p, 0)
		md.write(0, p)
		if err := os.Rename(m.view(rel+".old"), m.view(rel)); err != nil {
			t.Fatal(err)
		}
		q := randBytes(r, 5000)
		if _, err := f.WriteAt(q, 8000); err != nil {
			t.Fatalf("write after rename: %v", err)
		}
		md.write(8000, q)
		checkFile(t, f, &md, "open file after rename")
		f.Close()
		g, err := os.Open(m.view(rel))
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		checkFile(t, g, &md, "reopened under the new name")
		if _, err := os.Stat(m.view(rel + ".old")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("old name still there: %v", err)
		}
		return &md
	}},
	{"unlink-open", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		r := rand.New(rand.NewPCG(15, 16))
		var md model
		f, err := os.OpenFile(m.view(rel+".gone"), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		p := randBytes(r, 9000)
		f.WriteAt(p, 0)
		md.write(0, p)
		if err := os.Remove(m.view(rel + ".gone")); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(m.view(rel + ".gone")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("stat after unlink: %v", err)
		}
		q := randBytes(r, 3000)
		f.WriteAt(q, 7000)
		md.write(7000, q)
		checkFile(t, f, &md, "unlinked open file")
		// Something else for the at-rest check.
		os.WriteFile(m.view(rel), nil, 0o644)
		return &model{}
	}},
	{"chmod-chown-utimes", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		md := &model{b: []byte("hello")}
		if err := os.WriteFile(m.view(rel), md.b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(m.view(rel), 0o640); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(m.view(rel), 1234, 5678); err != nil {
			t.Fatal(err)
		}
		when := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
		if err := os.Chtimes(m.view(rel), when, when); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{m.view(rel), m.backing(rel)} {
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			sys := st.Sys().(*syscall.Stat_t)
			if st.Mode().Perm() != 0o640 || sys.Uid != 1234 || sys.Gid != 5678 || !st.ModTime().Equal(when) {
				t.Errorf("%s: mode %v uid %d gid %d mtime %v", p, st.Mode(), sys.Uid, sys.Gid, st.ModTime())
			}
		}
		if st, _ := os.Stat(m.view(rel)); st.Size() != 5 {
			t.Errorf("size %d, want 5", st.Size())
		}
		return md
	}},
	{"o-direct", func(t *testing.T, m *testMount, rel string, enc bool) *model {
		r := rand.New(rand.NewPCG(17, 18))
		var md model
		f, err := os.OpenFile(m.view(rel), os.O_RDWR|os.O_CREATE|syscall.O_DIRECT, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		buf, err := unix.Mmap(-1, 0, 2<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Munmap(buf)
		for _, w := range []struct{ off, n int64 }{{0, 4096}, {8192, 65536}, {1 << 20, 1 << 20}, {4096, 4096}, {40960, 12288}} {
			p := randBytes(r, int(w.n))
			copy(buf, p)
			if n, err := f.WriteAt(buf[:w.n], w.off); err != nil || n != int(w.n) {
				t.Fatalf("O_DIRECT write [%d,+%d): %d, %v", w.off, w.n, n, err)
			}
			md.write(w.off, p)
		}
		for _, rd := range []struct{ off, n int64 }{{0, 2 << 20}, {4096, 8192}, {1 << 20, 1 << 20}} {
			clear(buf)
			n, err := f.ReadAt(buf[:rd.n], rd.off)
			if err != nil && err != io.EOF {
				t.Fatalf("O_DIRECT read [%d,+%d): %v", rd.off, rd.n, err)
			}
			want := md.b[rd.off:min(rd.off+rd.n, int64(len(md.b)))]
			if n != len(want) || !bytes.Equal(buf[:n], want) {
				t.Fatalf("O_DIRECT read [%d,+%d): %d bytes, content mismatch", rd.off, rd.n, n)
			}
		}
		return &md
	}},
}

func blocks(t *testing.T, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

// TestFileOps runs every file operation on a plain file and on an
// encrypted one, checks the result through the mount, and then checks
// the bytes at rest; with the default options (writeback cache) and with
// the writeback cache off and kernel passthrough on for plain files.
func TestFileOps(t *testing.T) {
	for _, cfg := range []struct {
		name string
		opts Options
	}{
		{"writeback", Options{}},
		{"passthrough", Options{NoWritebackCache: true, Passthrough: true}},
	} {
		t.Run(cfg.name, func(t *testing.T) {
			m := mountTest(t, cfg.opts)
			for _, kind := range []struct {
				name string
				dir  string
				enc  bool
			}{{"plain", "plain/", false}, {"encrypted", "enc/", true}} {
				if err := os.MkdirAll(m.view(kind.dir), 0o755); err != nil {
					t.Fatal(err)
				}
				t.Run(kind.name, func(t *testing.T) {
					for _, tc := range fileCases {
						t.Run(tc.name, func(t *testing.T) {
							rel := kind.dir + tc.name
							md := tc.run(t, m, rel, kind.enc)
							if t.Failed() {
								return
							}
							// The engine writes a grown size into the
							// header at Close (or Sync): wait for RELEASE.
							waitReleased(t, m.v)
							checkAtRest(t, m, rel, kind.enc, md)
						})
					}
				})
			}
			if t.Failed() {
				t.Logf("view log:\n%s", m.logs.String())
			}
		})
	}
}

func TestDirectoryOps(t *testing.T) {
	m := mountTest(t, Options{})
	if err := os.MkdirAll(m.view("enc/sub/deeper"), 0o750); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(m.backing("enc/sub/deeper")); err != nil || !st.IsDir() || st.Mode().Perm() != 0o750 {
		t.Fatalf("backing dir: %v %v", st, err)
	}
	// A file created in a new subdirectory of an encrypted directory is
	// encrypted too.
	if err := os.WriteFile(m.view("enc/sub/deeper/f"), []byte("data data data"), 0o644); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(m.backing("enc/sub/deeper/f"))
	if !bytes.HasPrefix(raw, []byte(container.ContainerMagic)) {
		t.Fatal("file in a subdirectory of enc/ is not a container")
	}
	// Readdir lists it with its logical size (READDIRPLUS goes through
	// Lookup).
	ents, err := os.ReadDir(m.view("enc/sub/deeper"))
	if err != nil || len(ents) != 1 || ents[0].Name() != "f" {
		t.Fatalf("readdir: %v %v", ents, err)
	}
	info, _ := ents[0].Info()
	if info.Size() != 14 {
		t.Errorf("listed size %d, want 14", info.Size())
	}
	if err := os.Remove(m.view("enc/sub/deeper")); !errors.Is(err, syscall.ENOTEMPTY) {
		t.Errorf("rmdir of a non-empty dir: %v", err)
	}
	if err := os.Remove(m.view("enc/sub/deeper/f")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(m.view("enc/sub/deeper")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(m.backing("enc/sub/deeper")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("backing dir still there: %v", err)
	}
	// Directory rename.
	if err := os.Rename(m.view("enc/sub"), m.view("enc/sub2")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(m.backing("enc/sub2")); err != nil {
		t.Fatal(err)
	}
	// Symlinks and hard links.
	if err := os.Symlink("enc/sub2", m.view("link")); err != nil {
		t.Fatal(err)
	}
	if target, err := os.Readlink(m.view("link")); err != nil || target != "enc/sub2" {
		t.Fatalf("readlink: %q %v", target, err)
	}
	if err := os.WriteFile(m.view("enc/sub2/a"), []byte("12345"), 0o644); err != nil {
		t.Fatal(err)
	}
	// An encrypted file gets no second name (it would be judged by
	// either); a plain one may.
	if err := os.Link(m.view("enc/sub2/a"), m.view("enc/sub2/b")); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("hard link of an encrypted file: %v, want EPERM", err)
	}
	if err := os.WriteFile(m.view("pa"), []byte("12345"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(m.view("pa"), m.view("pb")); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(m.view("pb")); err != nil || string(got) != "12345" {
		t.Fatalf("hard link reads %q, %v", got, err)
	}
	if got, err := os.ReadFile(m.view("link/a")); err != nil || string(got) != "12345" {
		t.Fatalf("through the symlink: %q, %v", got, err)
	}
	// Statfs reports the backing file system.
	var sv, sb unix.Statfs_t
	if err := unix.Statfs(m.mnt, &sv); err != nil {
		t.Fatal(err)
	}
	if err := unix.Statfs(m.root, &sb); err != nil {
		t.Fatal(err)
	}
	if sv.Blocks != sb.Blocks || sv.Bsize != sb.Bsize {
		t.Errorf("statfs: view %d blocks of %d, backing %d of %d", sv.Blocks, sv.Bsize, sb.Blocks, sb.Bsize)
	}
}

// TestCrossBoundaryMoves checks that a rename or link that would put a
// plain file among encrypted ones (or a container among plain files) is
// refused with EXDEV, and that mv then copies through the view, which
// encrypts.
func TestCrossBoundaryMoves(t *testing.T) {
	requireTool(t, "mv")
	m := mountTest(t, Options{})
	secret := bytes.Repeat([]byte("TOPSECRET-"), 1000)
	if err := os.WriteFile(m.view("plainfile"), secret, 0o644); err != nil {
		t.Fatal(err)
	}
	err := os.Rename(m.view("plainfile"), m.view("enc/moved"))
	if !errors.Is(err, syscall.EXDEV) {
		t.Fatalf("rename plain -> enc/: %v, want EXDEV", err)
	}
	if err := os.Link(m.view("plainfile"), m.view("enc/linked")); !errors.Is(err, syscall.EXDEV) {
		t.Fatalf("link plain -> enc/: %v, want EXDEV", err)
	}
	if out, err := exec.Command("mv", m.view("plainfile"), m.view("enc/moved")).CombinedOutput(); err != nil {
		t.Fatalf("mv: %v: %s", err, out)
	}
	raw, _ := os.ReadFile(m.backing("enc/moved"))
	if !bytes.HasPrefix(raw, []byte(container.ContainerMagic)) || bytes.Contains(raw, []byte("TOPSECRET")) {
		t.Fatal("mv into enc/ left plaintext at rest")
	}
	if got, _ := os.ReadFile(m.view("enc/moved")); !bytes.Equal(got, secret) {
		t.Fatal("moved file reads differently")
	}
	// And back out: decrypted by the copy.
	if out, err := exec.Command("mv", m.view("enc/moved"), m.view("back")).CombinedOutput(); err != nil {
		t.Fatalf("mv out: %v: %s", err, out)
	}
	if raw, _ := os.ReadFile(m.backing("back")); !bytes.Equal(raw, secret) {
		t.Fatal("file moved out of enc/ is not plain at rest")
	}
	// Renames inside one side are plain renames.
	os.WriteFile(m.view("enc/x"), secret, 0o644)
	if err := os.Rename(m.view("enc/x"), m.view("enc/y")); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(m.view("enc/y")); !bytes.Equal(got, secret) {
		t.Fatal("renamed container reads differently")
	}
}

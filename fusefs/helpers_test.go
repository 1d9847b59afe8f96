package fusefs

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
)

// testBackend treats every file below a directory named "enc" as
// encrypted with one DEK, creates encrypted files there, and can mark
// files locked.
type testBackend struct {
	root string
	dek  *keys.DEK

	mu      sync.Mutex
	locked  map[string]string // rel -> reason
	busy    map[string]bool   // rel -> refused by MayOpen
	noTrunc map[string]bool   // rel -> refused by MayTruncate
	// settleTo: at its last close, Settle replaces the file with this
	// plain content; settled files are plain from then on.
	settleTo map[string][]byte
	settled  map[string]bool
	rwOpen   int // Open calls with readOnly=false
}

func newTestBackend(t testing.TB, root string) *testBackend {
	t.Helper()
	dek, err := keys.NewDEK()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dek.Destroy)
	return &testBackend{root: root, dek: dek, locked: map[string]string{}, busy: map[string]bool{}, noTrunc: map[string]bool{}, settleTo: map[string][]byte{}, settled: map[string]bool{}}
}

func inEncDir(rel string) bool {
	parts := strings.Split(rel, "/")
	for _, p := range parts[:len(parts)-1] {
		if p == "enc" {
			return true
		}
	}
	return false
}

func (b *testBackend) lock(rel, reason string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.locked[rel] = reason
}

func (b *testBackend) isSettled(rel string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.settled[rel]
}

func (b *testBackend) Unsettled(rel string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	_, ok := b.settleTo[rel]
	return ok
}

func (b *testBackend) Settle(rel string, isOpen func(string) bool, unchanged func() bool) ([]string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	data, ok := b.settleTo[rel]
	if !ok || (unchanged != nil && !unchanged()) {
		return nil, nil
	}
	p := filepath.Join(b.root, rel)
	if err := os.WriteFile(p+".new", data, 0o644); err != nil {
		return nil, err
	}
	if err := os.Rename(p+".new", p); err != nil {
		return nil, err
	}
	delete(b.settleTo, rel)
	b.settled[rel] = true
	return []string{rel}, nil
}

func (b *testBackend) MayTruncate(rel string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.noTrunc[rel] {
		return fmt.Errorf("%s: %w", rel, view.ErrKeyLines)
	}
	return nil
}

func (b *testBackend) MayOpen(rel string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.busy[rel] {
		return fmt.Errorf("%s: %w", rel, view.ErrBusy)
	}
	return nil
}

func (b *testBackend) Classify(rel string) (view.FileState, string, error) {
	b.mu.Lock()
	reason, locked := b.locked[rel]
	b.mu.Unlock()
	switch {
	case locked:
		return view.FileLocked, reason, nil
	case b.isSettled(rel):
		return view.FilePlain, "", nil
	case inEncDir(rel):
		return view.FileEncrypted, "", nil
	}
	return view.FilePlain, "", nil
}

func (b *testBackend) Open(rel string, readOnly bool) (*container.Container, error) {
	if !readOnly {
		b.mu.Lock()
		b.rwOpen++
		b.mu.Unlock()
	}
	return container.OpenContainer(filepath.Join(b.root, rel), b.dek, readOnly, "")
}

func (b *testBackend) Create(rel string, perm os.FileMode) (*container.Container, bool, error) {
	if !inEncDir(rel) {
		return nil, false, nil
	}
	c, err := container.CreateContainer(filepath.Join(b.root, rel), b.dek, b.createOptions(perm))
	if err != nil {
		return nil, false, err
	}
	return c, true, nil
}

func (b *testBackend) createOptions(perm os.FileMode) container.CreateOptions {
	return container.CreateOptions{
		Kind:    container.KindOther,
		Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: "vm-1"},
		Perm:    perm & 0o777,
	}
}

func (b *testBackend) WouldEncrypt(rel string) (bool, error) { return inEncDir(rel), nil }

// logBuffer collects the view's log lines for assertions.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

type testMount struct {
	root, mnt string
	b         *testBackend
	v         *View
	logs      *logBuffer
}

func (m *testMount) backing(rel string) string { return filepath.Join(m.root, rel) }
func (m *testMount) view(rel string) string    { return filepath.Join(m.mnt, rel) }

func requireFUSE(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("fusefs tests need root (mount(2) of a FUSE file system)")
		}
		t.Skip("needs root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("/dev/fuse: %v", err)
		}
		t.Skip("no /dev/fuse")
	}
}

// requireTool fails under CI=true and skips otherwise when a peer tool is
// missing: CI must never pass by silently skipping a peer.
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

// mountTest mounts a fresh datastore (with an "enc" directory) and always
// unmounts it when the test ends, even on failure.
func mountTest(t testing.TB, opts Options) *testMount {
	t.Helper()
	requireFUSE(t)
	dir := t.TempDir()
	m := &testMount{root: filepath.Join(dir, "store"), mnt: filepath.Join(dir, "mnt"), logs: &logBuffer{}}
	for _, d := range []string{m.root, m.mnt, filepath.Join(m.root, "enc")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	m.b = newTestBackend(t, m.root)
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(m.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	v, err := Mount(m.root, m.mnt, m.b, opts)
	if err != nil {
		t.Fatal(err)
	}
	m.v = v
	t.Cleanup(func() {
		if err := v.Unmount(true); err != nil {
			t.Errorf("unmount: %v", err)
		}
		v.Wait()
	})
	return m
}

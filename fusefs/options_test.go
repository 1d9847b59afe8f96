package fusefs

import (
	"bytes"
	"errors"
	"os"
	"syscall"
	"testing"
)

func TestReadOnlyMount(t *testing.T) {
	m := mountTest(t, Options{})
	data := bytes.Repeat([]byte("ro"), 5000)
	if err := os.WriteFile(m.view("enc/a"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := m.v.Unmount(false); err != nil {
		t.Fatal(err)
	}
	m.v.Wait()
	m.b.mu.Lock()
	m.b.rwOpen = 0
	m.b.mu.Unlock()
	v, err := Mount(m.root, m.mnt, m.b, Options{ReadOnly: true, Logger: m.v.st.log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Unmount(true); v.Wait() })
	if got, err := os.ReadFile(m.view("enc/a")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through a read-only view: %v", err)
	}
	if err := os.WriteFile(m.view("enc/a"), []byte("x"), 0o600); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write through a read-only view: %v, want EROFS", err)
	}
	if err := os.WriteFile(m.view("enc/new"), []byte("x"), 0o600); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("create through a read-only view: %v, want EROFS", err)
	}
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	if m.b.rwOpen != 0 {
		t.Fatalf("a read-only view opened %d containers for writing", m.b.rwOpen)
	}
}

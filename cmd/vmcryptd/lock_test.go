package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

// TestLockUnlock: read a mounted encrypted file, lock, get EACCES (on the
// open handle, whose page cache must be gone, and on a new open), see no
// key in status and none fetched while locked, unlock, read the same
// bytes again.
func TestLockUnlock(t *testing.T) {
	needView(t)
	dir := startLab(t, "--key-retry", "1s")
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "lockvm")
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "lockvm", "--disk", "8M:monolithicFlat", "--encrypt")
	mp := filepath.Join(dir, "view")
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	t.Cleanup(func() { vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp) })

	ents, _ := os.ReadDir(vm)
	var extent string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), "-flat.vmdk") {
			extent = filepath.Join(mp, "lockvm", e.Name())
		}
	}
	if extent == "" {
		t.Fatalf("no flat extent in %v", ents)
	}
	want := make([]byte, 256<<10)
	rand.Read(want)
	w, err := os.OpenFile(extent, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	w.Close()
	// Read through the page cache and keep the file open across the lock.
	f, err := os.Open(extent)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read before lock: %v, equal %v", err, bytes.Equal(got, want))
	}
	if st := labStatus(t, dir); st.CachedKeys == 0 || st.Locked {
		t.Fatalf("before lock: %d keys, locked %v", st.CachedKeys, st.Locked)
	}

	var lr api.LockResult
	if err := json.Unmarshal([]byte(mustRun(t, "--socket", sock, "lock", "--json")), &lr); err != nil {
		t.Fatal(err)
	}
	if lr.KEKsZeroed == 0 || lr.Views != 1 || lr.FilesSealed != 1 || lr.PagesInvalidated == 0 {
		t.Fatalf("lock result %+v", lr)
	}
	// The open handle: its cached pages are gone, so the read reaches the
	// view, which refuses it.
	if _, err := f.ReadAt(got, 1<<20); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("read on the open handle after lock: %v, want EACCES", err)
	}
	if _, err := os.ReadFile(extent); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("new open after lock: %v, want EACCES", err)
	}
	// Several retry intervals later, still nothing in memory.
	time.Sleep(2500 * time.Millisecond)
	st := labStatus(t, dir)
	if st.CachedKeys != 0 || !st.Locked || st.HostEncryption.KeyLoaded {
		t.Fatalf("after lock: %d keys cached, locked %v, host key loaded %v", st.CachedKeys, st.Locked, st.HostEncryption.KeyLoaded)
	}
	for _, v := range st.VMs {
		if !v.Locked || !strings.Contains(v.Reason, "vmcryptd lock") {
			t.Errorf("VM %s after lock: locked %v, reason %q", v.Dir, v.Locked, v.Reason)
		}
	}
	if !strings.Contains(mustRun(t, "--socket", sock, "status"), "LOCKED by vmcryptd lock") {
		t.Error("status does not say the daemon is locked")
	}
	// Operations needing a key are refused, without asking the KMS.
	if r := vmcryptd(t, nil, nil, "--socket", sock, "key", "create"); r.code == 0 || !strings.Contains(r.err, "vmcryptd lock") {
		t.Errorf("key create while locked: %d %q", r.code, r.err)
	}

	var ur api.UnlockResult
	if err := json.Unmarshal([]byte(mustRun(t, "--socket", sock, "unlock", "--json")), &ur); err != nil {
		t.Fatal(err)
	}
	if !ur.WasLocked || len(ur.Loaded) == 0 || len(ur.Failed) != 0 {
		t.Fatalf("unlock result %+v", ur)
	}
	if st := labStatus(t, dir); st.CachedKeys != len(ur.Loaded) || st.Locked {
		t.Fatalf("after unlock: %d keys, locked %v", st.CachedKeys, st.Locked)
	}
	// The handle sealed by the lock stays refused; a new open reads the
	// same bytes.
	if _, err := f.ReadAt(got, 1<<20); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("sealed handle after unlock: %v, want EACCES", err)
	}
	g, err := os.Open(extent)
	if err != nil {
		t.Fatalf("open after unlock: %v", err)
	}
	defer g.Close()
	clear(got)
	if _, err := g.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read after unlock: %v, equal %v", err, bytes.Equal(got, want))
	}
	audit, _ := os.ReadFile(filepath.Join(dir, "audit.log"))
	for _, op := range []string{`"op":"lock"`, `"op":"unlock"`} {
		if !bytes.Contains(audit, []byte(op)) {
			t.Errorf("audit log lacks %s", op)
		}
	}
}

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

	"github.com/vmcryptd/vmcryptd/internal/manager"
)

// TestManagerHostLock: `manager host lock host1` zeroes every key on
// host1 at once (views answer EACCES, cached_keys 0) while host2 keeps
// working; a restarted host1 gets no key back while locked; `manager host
// unlock host1` brings the same bytes back. The key retry interval is
// 30 s, so a lock seen sooner came through the watch, not the heartbeat.
func TestManagerHostLock(t *testing.T) {
	needView(t)
	labArgs := []string{"--hosts", "2", "--key-retry", "30s"}
	dir := startLab(t, labArgs...)
	h1, h2 := hostSock(dir, 1), hostSock(dir, 2)
	msock := filepath.Join(dir, "manager", "manager.sock")
	vm1 := filepath.Join(dir, "shared", "lvm1")
	vm2 := filepath.Join(dir, "shared", "lvm2")
	mustRun(t, "--socket", h1, "vm", "create", "--name", "lvm1", "--disk", "4M", "--encrypt", vm1)
	mustRun(t, "--socket", h2, "vm", "create", "--name", "lvm2", "--disk", "4M", "--encrypt", vm2)
	data1, data2 := make([]byte, 128<<10), make([]byte, 128<<10)
	rand.Read(data1)
	rand.Read(data2)
	mp2 := filepath.Join(t.TempDir(), "view2")
	if got, err := viewReadWrite(t, h2, mp2, "lvm2", data2, len(data2)); err != nil || !bytes.Equal(got, data2) {
		t.Fatalf("host2 view before the lock: %v", err)
	}

	// host1 keeps its view mounted and a file open across the lock.
	mp1 := filepath.Join(t.TempDir(), "view1")
	mustRun(t, "--socket", h1, "mount", "shared", mp1)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			vmcryptd(t, nil, nil, "--socket", h1, "unmount", "--force", mp1)
		}
	})
	extent := filepath.Join(mp1, "lvm1", "lvm1-flat.vmdk")
	w, err := os.OpenFile(extent, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := w.WriteAt(data1, 64<<10); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data1))
	if _, err := w.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, data1) {
		t.Fatalf("host1 read before the lock: %v", err)
	}
	if st := hostStatus(t, h1); st.CachedKeys == 0 || st.Locked {
		t.Fatalf("host1 before the lock: %d keys, locked %v", st.CachedKeys, st.Locked)
	}

	start := time.Now()
	out := mustRun(t, "manager", "host", "lock", "host1", "--manager-socket", msock)
	if !strings.Contains(out, "host host1 locked") {
		t.Fatalf("manager host lock: %s", out)
	}
	var delay time.Duration
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		st := hostStatus(t, h1)
		if st.Locked && st.CachedKeys == 0 && st.KeySource.LockedByManager {
			delay = time.Since(start)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("host1 not locked 20 s after manager host lock: locked %v, %d keys, key source %+v", st.Locked, st.CachedKeys, st.KeySource)
		}
	}
	t.Logf("lock delay (manager host lock to host1 status locked, cached_keys 0): %v", delay)
	if _, err := w.ReadAt(got, 64<<10); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("host1 read on the open handle after the lock: %v, want EACCES", err)
	}
	if _, err := os.ReadFile(extent); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("host1 new open after the lock: %v, want EACCES", err)
	}
	for _, v := range hostStatus(t, h1).VMs {
		if !v.Locked || !strings.Contains(v.Reason, "locked by the manager") {
			t.Errorf("host1 VM %s after the lock: locked %v, reason %q", v.Dir, v.Locked, v.Reason)
		}
	}
	if out := mustRun(t, "--socket", h1, "status"); !strings.Contains(out, "LOCKED by the manager") {
		t.Errorf("host1 status does not say the manager locked it:\n%s", out)
	}
	// The host's own unlock cannot undo the manager's lock.
	if r := vmcryptd(t, nil, nil, "--socket", h1, "unlock"); r.code == 0 || !strings.Contains(r.err, "manager host unlock host1") {
		t.Errorf("vmcryptd unlock on a manager-locked host: exit %d, %s", r.code, r.err)
	}
	// host2 is not affected.
	waitVM(t, h2, vm2, "")
	if got, err := viewReadWrite(t, h2, mp2, "lvm2", nil, len(data2)); err != nil || !bytes.Equal(got, data2) {
		t.Fatalf("host2 view while host1 is locked: %v", err)
	}
	var hosts []manager.HostInfo
	if err := json.Unmarshal([]byte(mustRun(t, "manager", "host", "list", "--json", "--manager-socket", msock)), &hosts); err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts {
		if h.Locked != (h.Name == "host1") {
			t.Errorf("host list: %s locked %v", h.Name, h.Locked)
		}
	}
	if out := mustRun(t, "manager", "host", "list", "--manager-socket", msock); !strings.Contains(out, "yes (by") {
		t.Errorf("host list does not show host1 locked:\n%s", out)
	}
	w.Close()
	mustRun(t, "--socket", h1, "unmount", "--force", mp1)
	mounted = false

	// kill -9 host1 and restart it: still locked, no key fetched.
	pidFile := filepath.Join(dir, "host1", "daemon.pid")
	syscall.Kill(readPID(pidFile), syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); alive(pidFile) && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	mustRun(t, append([]string{"lab", "up", "--dir", dir}, labArgs...)...)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		st := hostStatus(t, h1)
		if st.KeySource.LockedByManager {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("restarted host1 does not report the manager's lock: %+v", st.KeySource)
		}
	}
	time.Sleep(2 * time.Second)
	if st := hostStatus(t, h1); st.CachedKeys != 0 || !st.Locked {
		t.Fatalf("restarted host1 while locked: %d keys, locked %v", st.CachedKeys, st.Locked)
	}
	if _, err := viewReadWrite(t, h1, mp1, "lvm1", nil, 4096); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("restarted host1 read while locked: %v, want EACCES", err)
	}

	start = time.Now()
	if out := mustRun(t, "manager", "host", "unlock", "host1", "--manager-socket", msock); !strings.Contains(out, "host host1 unlocked") {
		t.Fatalf("manager host unlock: %s", out)
	}
	waitVM(t, h1, vm1, "")
	t.Logf("unlock delay (manager host unlock to host1's VM unlocked): %v", time.Since(start))
	if got, err := viewReadWrite(t, h1, mp1, "lvm1", nil, len(data1)); err != nil || !bytes.Equal(got, data1) {
		t.Fatalf("host1 after unlock reads other bytes (err %v)", err)
	}
	if st := hostStatus(t, h1); st.Locked || st.KeySource.LockedByManager || st.CachedKeys == 0 {
		t.Fatalf("host1 after unlock: locked %v, by manager %v, %d keys", st.Locked, st.KeySource.LockedByManager, st.CachedKeys)
	}

	audit, err := os.ReadFile(filepath.Join(dir, "manager", "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range []string{"manager.host.lock", "manager.host.unlock"} {
		found := false
		for _, line := range strings.Split(string(audit), "\n") {
			if strings.Contains(line, `"op":"`+op+`"`) && strings.Contains(line, `"privilege":"Cryptographer.ManageKeys"`) && strings.Contains(line, `"result":"ok"`) && strings.Contains(line, "host1") {
				found = true
			}
		}
		if !found {
			t.Errorf("manager audit log has no %s line for host1", op)
		}
	}
}

package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/manager"
)

// TestManagerHostKey: in manager mode each host's encryption mode key is
// made through the manager and recorded there for that host only
// (inventory created_for, host list host_key); a host killed and
// restarted gets the same host key back through the manager.
func TestManagerHostKey(t *testing.T) {
	labArgs := []string{"--hosts", "2", "--key-retry", "1s"}
	dir := startLab(t, labArgs...)
	msock := filepath.Join(dir, "manager", "manager.sock")
	var before [3]string
	for k := 1; k <= 2; k++ {
		he := hostStatus(t, hostSock(dir, k)).HostEncryption
		for deadline := time.Now().Add(20 * time.Second); !he.KeyLoaded && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			he = hostStatus(t, hostSock(dir, k)).HostEncryption
		}
		if !he.Enabled || !he.KeyLoaded || he.KeyID == "" {
			t.Fatalf("host%d host encryption: %+v", k, he)
		}
		before[k] = he.Provider + "/" + he.KeyID
	}
	if before[1] == before[2] {
		t.Fatalf("both hosts share host key %s", before[1])
	}
	// The manager records each host key for its host, by id only.
	var inv struct {
		Keys map[string]struct {
			CreatedFor string `json:"created_for"`
		} `json:"keys"`
	}
	raw, err := os.ReadFile(filepath.Join(dir, "manager", "state", "inventory.json"))
	if err != nil {
		matches, _ := filepath.Glob(filepath.Join(dir, "manager", "*", "inventory.json"))
		if len(matches) != 1 {
			t.Fatalf("manager inventory: %v (found %v)", err, matches)
		}
		raw, err = os.ReadFile(matches[0])
	}
	if err != nil || json.Unmarshal(raw, &inv) != nil {
		t.Fatalf("manager inventory: %v", err)
	}
	var hosts []manager.HostInfo
	if err := json.Unmarshal([]byte(mustRun(t, "manager", "host", "list", "--json", "--manager-socket", msock)), &hosts); err != nil {
		t.Fatal(err)
	}
	for k := 1; k <= 2; k++ {
		name := "host" + itoa(k)
		if got := inv.Keys[before[k]].CreatedFor; got != name {
			t.Errorf("inventory: host key %s of %s recorded for %q", before[k], name, got)
		}
		for _, h := range hosts {
			if h.Name == name && (h.HostEncryption != "enabled" || h.HostKey != before[k]) {
				t.Errorf("host list: %s host encryption %q key %q, want enabled %s", name, h.HostEncryption, h.HostKey, before[k])
			}
		}
	}

	// kill -9 host1 and restart it: the same host key comes back.
	pidFile := filepath.Join(dir, "host1", "daemon.pid")
	oldPID := hostStatus(t, hostSock(dir, 1)).PID
	syscall.Kill(readPID(pidFile), syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); alive(pidFile) && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	mustRun(t, append([]string{"lab", "up", "--dir", dir}, labArgs...)...)
	st := hostStatus(t, hostSock(dir, 1))
	for deadline := time.Now().Add(20 * time.Second); !st.HostEncryption.KeyLoaded && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		st = hostStatus(t, hostSock(dir, 1))
	}
	if st.PID == oldPID || !st.HostEncryption.KeyLoaded || st.HostEncryption.Provider+"/"+st.HostEncryption.KeyID != before[1] {
		t.Fatalf("host1 after restart: pid %d (was %d), host encryption %+v, want key %s loaded", st.PID, oldPID, st.HostEncryption, before[1])
	}
	if st.KeySource.Mode != "manager" {
		t.Fatalf("host1 key source after restart: %+v", st.KeySource)
	}
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/manager"
)

// TestManagerRestartStorm measures a host restart storm through the
// manager: 100 VMs on 2 hosts under 10 KEKs (plus the 2 host keys), every
// daemon killed with SIGKILL and restarted at once, timed until every VM
// on both hosts is unlocked; "cold" also restarts the manager (its key
// cache empty: each KEK fetched from the KMS once), "warm" only the hosts.
// Rounds alternate; medians are reported. Opt-in: VMCRYPTD_STORM=1
// (VMCRYPTD_STORM_ROUNDS, default 3).
func TestManagerRestartStorm(t *testing.T) {
	if os.Getenv("VMCRYPTD_STORM") != "1" {
		t.Skip("opt-in: VMCRYPTD_STORM=1")
	}
	rounds := 3
	fmt.Sscan(os.Getenv("VMCRYPTD_STORM_ROUNDS"), &rounds)
	dir := startLab(t, "--hosts", "2", "--key-retry", "1s")
	ctx := context.Background()
	socks := []string{hostSock(dir, 1), hostSock(dir, 2)}
	msock := filepath.Join(dir, "manager", "manager.sock")
	const perHost, keysPerHost = 50, 5
	setup := time.Now()
	for h, sock := range socks {
		c := api.NewClient(sock)
		var key api.VMRequest
		for i := 0; i < perHost; i++ {
			vm := filepath.Join(dir, fmt.Sprintf("host%d", h+1), "datastore", fmt.Sprintf("vm%02d", i))
			first := i%(perHost/keysPerHost) == 0
			req := api.CreateRequest{Dir: vm, Name: filepath.Base(vm), Memory: 4 << 20, Disks: []api.DiskSpec{{Size: 1 << 20}}, Encrypt: first}
			var st struct {
				KEKs []string `json:"keks"`
			}
			if err := c.Do(ctx, "POST", "/vm/create", req, &st); err != nil {
				t.Fatal(err)
			}
			if first {
				ref := st.KEKs[0]
				key = api.VMRequest{Provider: ref[:len("lab")], KeyID: ref[len("lab/"):]}
				continue
			}
			r := key
			r.Dir = vm
			if err := c.Stream(ctx, "POST", "/vm/encrypt", r, nil, func(json.RawMessage) {}); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Logf("set-up of %d VMs under %d KEKs: %s", 2*perHost, 2*keysPerHost, time.Since(setup).Round(time.Millisecond))

	unlocked := func() bool {
		for _, sock := range socks {
			var st api.Status
			if err := api.NewClient(sock).Do(ctx, "GET", "/status", nil, &st); err != nil || len(st.VMs) != perHost {
				return false
			}
			for _, vm := range st.VMs {
				if vm.Locked {
					return false
				}
			}
		}
		return true
	}
	fetches := func() int64 {
		var st manager.Status
		if err := api.NewClient(msock).Do(ctx, "GET", "/status", nil, &st); err != nil {
			t.Fatal(err)
		}
		return st.KMSFetches
	}
	kill := func(pidFile string) {
		syscall.Kill(readPID(pidFile), syscall.SIGKILL)
		for deadline := time.Now().Add(10 * time.Second); alive(pidFile) && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
	}
	storm := func(cold bool) (time.Duration, int64) {
		before := int64(0)
		if !cold {
			before = fetches()
		}
		kill(filepath.Join(dir, "host1", "daemon.pid"))
		kill(filepath.Join(dir, "host2", "daemon.pid"))
		if cold {
			kill(filepath.Join(dir, "manager", "manager.pid"))
		}
		start := time.Now()
		mustRun(t, "lab", "up", "--dir", dir, "--hosts", "2", "--key-retry", "1s")
		for !unlocked() {
			if time.Since(start) > 2*time.Minute {
				t.Fatal("VMs still locked after 2 minutes")
			}
			time.Sleep(20 * time.Millisecond)
		}
		return time.Since(start), fetches() - before
	}
	var cold, warm []time.Duration
	for r := 0; r < rounds; r++ {
		d, n := storm(true)
		if n != 2*keysPerHost+2 {
			t.Errorf("cold storm: %d KMS fetches, want %d (10 KEKs + 2 host keys, each once)", n, 2*keysPerHost+2)
		}
		cold = append(cold, d)
		d, n = storm(false)
		if n != 0 {
			t.Errorf("warm storm: %d KMS fetches, want 0", n)
		}
		warm = append(warm, d)
	}
	med := func(l []time.Duration) time.Duration {
		s := append([]time.Duration(nil), l...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)/2]
	}
	t.Logf("restart storm, %d VMs on 2 hosts under %d KEKs, %d alternating rounds: cold (manager + hosts) median %s %v, warm (hosts only) median %s %v, cold/warm %.2f",
		2*perHost, 2*keysPerHost, rounds, med(cold), cold, med(warm), warm, float64(med(cold))/float64(med(warm)))
}

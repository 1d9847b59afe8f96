package main

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/fusefs"
	"github.com/vmcryptd/vmcryptd/internal/config"
)

// killDaemon sends SIGKILL to the daemon of pidPath and waits until it is
// gone.
func killDaemon(t *testing.T, pidPath string) {
	t.Helper()
	if err := syscall.Kill(readPID(pidPath), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(15 * time.Second); alive(pidPath); {
		if time.Now().After(deadline) {
			t.Fatal("killed daemon did not exit")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func requireDisconnected(t *testing.T, mp string) {
	t.Helper()
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(mp, &sfs); !errors.Is(err, syscall.ENOTCONN) && !errors.Is(err, syscall.ECONNABORTED) {
		t.Fatalf("%s after kill -9: statfs %v, want ENOTCONN or ECONNABORTED", mp, err)
	}
}

// writeSynced writes data at off of path through a view and fsyncs it.
func writeSynced(t *testing.T, path string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func readBack(t *testing.T, path string, off int64, want []byte) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: data fsynced before the kill -9 does not read back", path)
	}
}

// A daemon killed with kill -9 while writes run through its views leaves
// dead FUSE mounts (ENOTCONN). The restarted daemon detaches them and
// brings its configured and remembered mounts back, with the fsynced data;
// `vmcryptd mount` and `unmount --force` clear dead views that another
// daemon left behind.
func TestStaleMountsAfterKill(t *testing.T) {
	needView(t)
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	pidPath := filepath.Join(dir, "daemon.pid")
	vm := filepath.Join(dir, "datastore", "stalevm")
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "stalevm", "--disk", "16M", "--encrypt")
	cfgMP, stateMP := filepath.Join(dir, "view-config"), filepath.Join(dir, "view-state")
	mpMount, mpForce := filepath.Join(dir, "view-other1"), filepath.Join(dir, "view-other2")
	t.Cleanup(func() {
		for _, mp := range []string{cfgMP, stateMP, mpMount, mpForce} {
			vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp)
			// Whatever failed, no dead mount stays behind.
			fusefs.CleanupStale(mp)
		}
	})
	// A configured mount (lab up rewrites the config, so the daemon alone
	// is restarted)...
	if err := stopPID(pidPath); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(filepath.Join(dir, "vmcryptd.toml"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Mounts = append(cfg.Mounts, config.Mount{Datastore: "lab", Mountpoint: cfgMP})
	if err := config.Write(filepath.Join(dir, "vmcryptd.toml"), cfg); err != nil {
		t.Fatal(err)
	}
	restartDaemon(t, dir)
	// ... and one the daemon remembers.
	mustRun(t, "--socket", sock, "mount", "lab", stateMP)
	waitMounts(t, sock, cfgMP, stateMP)

	disk := func(mp string) string { return filepath.Join(mp, "stalevm", "stalevm-flat.vmdk") }
	synced := make([]byte, 1<<20)
	rand.Read(synced)
	writeSynced(t, disk(cfgMP), 1<<20, synced)
	writeSynced(t, disk(stateMP), 4<<20, synced[:64<<10])
	// Writes still running through both views when the daemon dies.
	stop := make(chan struct{})
	writers := make(chan error, 2)
	for _, mp := range []string{cfgMP, stateMP} {
		go func() {
			f, err := os.OpenFile(disk(mp), os.O_RDWR, 0)
			if err != nil {
				writers <- err
				return
			}
			defer f.Close()
			buf := make([]byte, 256<<10)
			for i := int64(0); ; i++ {
				select {
				case <-stop:
					writers <- nil
					return
				default:
				}
				if _, err := f.WriteAt(buf, 8<<20+(i%16)*int64(len(buf))); err != nil {
					writers <- nil // the view died under it, as expected
					return
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	killDaemon(t, pidPath)
	close(stop)
	for range 2 {
		if err := <-writers; err != nil {
			t.Fatal(err)
		}
	}
	requireDisconnected(t, cfgMP)
	requireDisconnected(t, stateMP)
	// Past the view's attribute timeout the kernel no longer answers
	// stat from its cache (then mkdir said "file exists").
	time.Sleep(1500 * time.Millisecond)

	restartDaemon(t, dir)
	waitMounts(t, sock, cfgMP, stateMP)
	readBack(t, disk(cfgMP), 1<<20, synced)
	readBack(t, disk(stateMP), 4<<20, synced[:64<<10])
	if log, _ := os.ReadFile(filepath.Join(dir, "daemon.log")); bytes.Contains(log, []byte("remount failed")) {
		t.Fatalf("daemon log:\n%s", log)
	}

	// Dead views another daemon left: a second, key-less daemon mounts a
	// plain directory twice and is killed.
	other := t.TempDir()
	plain := filepath.Join(other, "ds")
	os.MkdirAll(plain, 0o755)
	os.WriteFile(filepath.Join(plain, "f"), []byte("plain"), 0o644)
	otherSock := filepath.Join(other, "d.sock")
	otherCfg := filepath.Join(other, "d.toml")
	os.WriteFile(otherCfg, []byte(fmt.Sprintf("socket = %q\nstate_dir = %q\n", otherSock, filepath.Join(other, "state"))), 0o600)
	otherPid := filepath.Join(other, "d.pid")
	startDaemon(t, filepath.Join(other, "d.log"), otherPid, otherSock, otherCfg)
	t.Cleanup(func() {
		if alive(otherPid) {
			syscall.Kill(readPID(otherPid), syscall.SIGKILL)
		}
	})
	mustRun(t, "--socket", otherSock, "mount", plain, mpMount)
	mustRun(t, "--socket", otherSock, "mount", plain, mpForce)
	killDaemon(t, otherPid)
	requireDisconnected(t, mpMount)
	requireDisconnected(t, mpForce)
	time.Sleep(1500 * time.Millisecond)

	mustRun(t, "--socket", sock, "mount", "lab", mpMount)
	readBack(t, disk(mpMount), 1<<20, synced)
	out := mustRun(t, "--socket", sock, "unmount", "--force", mpForce)
	if !strings.Contains(out, "unmounted") {
		t.Fatalf("unmount --force of a dead view: %q", out)
	}
	if ents, err := os.ReadDir(mpForce); err != nil || len(ents) != 0 {
		t.Fatalf("%s after unmount --force: %v %v", mpForce, ents, err)
	}
	// A directory that is no mount at all is still not ours.
	if r := vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mpForce); r.code == 0 || !strings.Contains(r.err, "not a vmcryptd mount") {
		t.Fatalf("unmount --force of a plain directory: %d %q", r.code, r.err)
	}
}

// waitMounts waits until the daemon's status lists every mountpoint.
func waitMounts(t *testing.T, sock string, mps ...string) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; {
		st := labStatus(t, filepath.Dir(sock))
		have := map[string]bool{}
		for _, m := range st.Mounts {
			have[m.Mountpoint] = true
		}
		missing := ""
		for _, mp := range mps {
			if !have[mp] {
				missing = mp
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(filepath.Dir(sock), "daemon.log"))
			t.Fatalf("mount %s not restored: %+v\n%s", missing, st.Mounts, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

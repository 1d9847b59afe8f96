package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

// startCLI starts a CLI command in the background (it may never finish on
// its own); it is killed at cleanup. The returned function tells whether
// it has finished, and its output so far.
func startCLI(t *testing.T, args ...string) func() (bool, string) {
	t.Helper()
	self, _ := os.Executable()
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), asMainEnv+"=1")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	return func() (bool, string) {
		select {
		case <-done:
			return true, out.String()
		default:
			return false, ""
		}
	}
}

// timedCLI runs the CLI and reports how long it took.
func timedCLI(t *testing.T, args ...string) (runResult, time.Duration) {
	t.Helper()
	start := time.Now()
	r := vmcryptd(t, nil, nil, args...)
	return r, time.Since(start)
}

// timedStatus asks the daemon for its status from this process (no CLI
// start-up in the figure) and reports how long the answer took.
func timedStatus(t *testing.T, sock string) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := api.NewClient(sock).Do(ctx, "GET", "/status", nil, &api.Status{}); err != nil {
		t.Fatalf("status: %v after %v", err, time.Since(start))
	}
	return time.Since(start)
}

// sigtermWithin sends SIGTERM to the daemon and fails unless it has exited
// within limit.
func sigtermWithin(t *testing.T, pidPath string, limit time.Duration) time.Duration {
	t.Helper()
	pid := readPID(pidPath)
	start := time.Now()
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for alive(pidPath) {
		if time.Since(start) > limit {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("daemon still running %v after SIGTERM", limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func mounted(t *testing.T, mp string) bool {
	t.Helper()
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(info), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == mp {
			return true
		}
	}
	return false
}

// A FIFO where a VM's descriptor or extent belongs wedges whatever opens
// it (until the engine refuses non-regular files). The
// daemon still answers status at once while an encrypt, a vm status and a
// mount of that datastore are stuck on it; SIGTERM ends the daemon within
// seconds (views unmounted, socket gone); after a restart the mount of the
// datastore comes back for the other VMs while status keeps answering.
func TestStuckFileNeverWedgesDaemon(t *testing.T) {
	needView(t)
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	pidPath := filepath.Join(dir, "daemon.pid")
	ds := filepath.Join(dir, "datastore")
	okvm := filepath.Join(ds, "okvm")
	mustRun(t, "--socket", sock, "vm", "create", okvm, "--name", "okvm", "--disk", "4M", "--encrypt")
	// One VM whose descriptor is a FIFO (layout loading reads it), one
	// whose flat extent is (a conversion opens it).
	fifovm, fifoext := filepath.Join(ds, "fifovm"), filepath.Join(ds, "fifoext")
	mustRun(t, "--socket", sock, "vm", "create", fifovm, "--name", "fifovm", "--disk", "4M")
	mustRun(t, "--socket", sock, "vm", "create", fifoext, "--name", "fifoext", "--disk", "4M")
	for _, p := range []string{filepath.Join(fifovm, "fifovm.vmdk"), filepath.Join(fifoext, "fifoext-flat.vmdk")} {
		os.Remove(p)
		if err := syscall.Mkfifo(p, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mp := filepath.Join(dir, "view")
	t.Cleanup(func() {
		vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp)
		if mounted(t, mp) {
			syscall.Unmount(mp, syscall.MNT_DETACH)
			t.Errorf("%s left mounted", mp)
		}
	})

	enc := startCLI(t, "--socket", sock, "vm", "encrypt", fifoext, "--json")
	enc2 := startCLI(t, "--socket", sock, "vm", "encrypt", fifovm, "--json")
	vst := startCLI(t, "--socket", sock, "vm", "status", fifovm)
	time.Sleep(500 * time.Millisecond)
	for name, f := range map[string]func() (bool, string){"vm encrypt (FIFO extent)": enc, "vm encrypt (FIFO descriptor)": enc2, "vm status": vst} {
		fin, out := f()
		t.Logf("%s of the FIFO VM: finished %v %s", name, fin, out)
	}
	r, took := timedCLI(t, "--socket", sock, "mount", "lab", mp)
	t.Logf("mount with a FIFO VM in the datastore: exit %d in %v", r.code, took.Round(time.Millisecond))
	if r.code != 0 {
		t.Fatalf("mount: %s", r.err)
	}
	if _, err := os.Stat(filepath.Join(mp, "okvm", "okvm.nvram")); err != nil {
		t.Fatalf("the view does not serve the other VM: %v", err)
	}
	// A second view of the datastore does not wait for the FIFO again:
	// its read is still stuck, so the VM is skipped at once.
	mp2 := filepath.Join(dir, "view2")
	r, took = timedCLI(t, "--socket", sock, "mount", "lab", mp2)
	t.Logf("second mount: exit %d in %v", r.code, took.Round(time.Millisecond))
	if r.code != 0 || took > 4*time.Second {
		t.Fatalf("second mount: exit %d after %v: %s", r.code, took, r.err)
	}
	mustRun(t, "--socket", sock, "unmount", mp2)
	for i := 0; i < 3; i++ {
		took := timedStatus(t, sock)
		t.Logf("status while operations are stuck: %v", took.Round(time.Millisecond))
		if took > time.Second {
			t.Fatalf("status took %v", took)
		}
	}
	took = sigtermWithin(t, pidPath, 15*time.Second)
	t.Logf("SIGTERM with stuck operations: exited in %v", took.Round(time.Millisecond))
	if mounted(t, mp) {
		t.Fatal("the view is still mounted after the daemon exited")
	}
	if _, err := os.Stat(sock); err == nil {
		t.Fatal("socket left behind")
	}

	// Restart: the remembered mount is restored although registering the
	// datastore's VMs gets stuck on the FIFO; status answers meanwhile.
	start := time.Now()
	restartDaemon(t, dir)
	took = timedStatus(t, sock)
	t.Logf("restarted daemon: serving after %v, status in %v", time.Since(start).Round(time.Millisecond), took.Round(time.Millisecond))
	if took > time.Second {
		t.Fatalf("status after restart took %v", took)
	}
	waitMounts(t, sock, mp)
	if _, err := os.Stat(filepath.Join(mp, "okvm", "okvm.nvram")); err != nil {
		t.Fatalf("restored view: %v", err)
	}
	startCLI(t, "--socket", sock, "vm", "encrypt", fifoext, "--json")
	startCLI(t, "--socket", sock, "vm", "status", fifovm)
	time.Sleep(300 * time.Millisecond)
	took = sigtermWithin(t, pidPath, 15*time.Second)
	t.Logf("second SIGTERM: exited in %v", took.Round(time.Millisecond))
	if mounted(t, mp) {
		t.Fatal("the view is still mounted after the daemon exited")
	}
}

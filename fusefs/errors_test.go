package fusefs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// waitReleased waits until the view has no open handles (RELEASE reaches
// the daemon after close(2) returns).
func waitReleased(t *testing.T, v *View) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); len(v.OpenFiles()) > 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("handles still open: %v", v.OpenFiles())
		}
	}
}

func TestLockedFile(t *testing.T) {
	m := mountTest(t, Options{})
	data := bytes.Repeat([]byte{7}, 12345)
	if err := os.WriteFile(m.view("enc/locked.nvram"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	waitReleased(t, m.v)
	m.b.lock("enc/locked.nvram", "key lab/123 not available")

	// Listed, with the header's logical size.
	ents, err := os.ReadDir(m.view("enc"))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range ents {
		if e.Name() == "locked.nvram" {
			found = true
			info, err := e.Info()
			if err != nil || info.Size() != 12345 {
				t.Errorf("listed size %v, %v; want 12345", info, err)
			}
		}
	}
	if !found {
		t.Fatal("locked file not listed")
	}
	_, err = os.ReadFile(m.view("enc/locked.nvram"))
	if !errors.Is(err, syscall.EACCES) {
		t.Fatalf("open of a locked file: %v, want EACCES", err)
	}
	if err := os.Truncate(m.view("enc/locked.nvram"), 0); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("truncate of a locked file: %v, want EACCES", err)
	}
	logs := m.logs.String()
	if !strings.Contains(logs, "enc/locked.nvram") || !strings.Contains(logs, "key lab/123 not available") {
		t.Fatalf("log does not name the file and the reason:\n%s", logs)
	}
	// Nothing was changed at rest.
	c, err := container.OpenContainer(m.backing("enc/locked.nvram"), m.b.dek, true, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Size() != 12345 {
		t.Fatalf("size at rest %d", c.Size())
	}
}

func TestDamagedContainers(t *testing.T) {
	m := mountTest(t, Options{})
	payload := bytes.Repeat([]byte("0123456789"), 10000)
	for _, name := range []string{"good", "tampered", "truncated"} {
		if err := os.WriteFile(m.view("enc/"+name), payload, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(m.view("plain.txt"), []byte("plain"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitReleased(t, m.v)

	// Flip one bit of the owner id ("vm-1" at offset 74) in both header
	// slots: the slots still parse, but their MAC fails.
	f, err := os.OpenFile(m.backing("enc/tampered"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{75, 512 + 75} {
		b := make([]byte, 1)
		f.ReadAt(b, off)
		b[0] ^= 1
		f.WriteAt(b, off)
	}
	f.Close()
	// Cut the payload short of what the header promises.
	if err := os.Truncate(m.backing("enc/truncated"), container.HeaderSize+100); err != nil {
		t.Fatal(err)
	}

	for _, name := range []string{"tampered", "truncated"} {
		_, err := os.ReadFile(m.view("enc/" + name))
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("reading damaged %s: %v, want EIO", name, err)
		}
		if !strings.Contains(m.logs.String(), "enc/"+name) {
			t.Errorf("log does not name enc/%s:\n%s", name, m.logs.String())
		}
		// Still listed; stat works.
		if _, err := os.Stat(m.view("enc/" + name)); err != nil {
			t.Errorf("stat of damaged %s: %v", name, err)
		}
	}
	if !strings.Contains(m.logs.String(), "tampered or corrupt") || !strings.Contains(m.logs.String(), "truncated") {
		t.Errorf("log does not give the reasons:\n%s", m.logs.String())
	}
	// The rest of the mount is unaffected.
	if got, err := os.ReadFile(m.view("enc/good")); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("good container after the failures: %v", err)
	}
	if got, err := os.ReadFile(m.view("plain.txt")); err != nil || string(got) != "plain" {
		t.Fatalf("plain file after the failures: %q %v", got, err)
	}
	if err := os.WriteFile(m.view("enc/new"), payload, 0o600); err != nil {
		t.Fatalf("creating a file after the failures: %v", err)
	}
}

func TestUnmountRefusedWhileOpen(t *testing.T) {
	m := mountTest(t, Options{})
	if err := os.WriteFile(m.view("enc/disk.vmdk"), []byte("abc"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(m.view("notes.txt"), []byte("abc"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(m.view("enc/disk.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	g, err := os.Open(m.view("notes.txt"))
	if err != nil {
		t.Fatal(err)
	}
	err = m.v.Unmount(false)
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "enc/disk.vmdk") || !strings.Contains(err.Error(), "notes.txt") {
		t.Fatalf("unmount with open files: %v; want ErrBusy listing both files", err)
	}
	// Still mounted and serving.
	if b, err := os.ReadFile(m.view("enc/disk.vmdk")); err != nil || string(b) != "abc" {
		t.Fatalf("after refused unmount: %q %v", b, err)
	}
	g.Close()
	err = m.v.Unmount(false)
	if !errors.Is(err, ErrBusy) || strings.Contains(err.Error(), "notes.txt") {
		t.Fatalf("unmount with one file open: %v", err)
	}
	f.Close()
	if err := m.v.Unmount(false); err != nil {
		t.Fatalf("unmount after closing: %v", err)
	}
	m.v.Wait()
	if isMounted(t, m.mnt) {
		t.Fatal("still mounted")
	}
}

func TestForcedUnmountWithOpenFile(t *testing.T) {
	m := mountTest(t, Options{})
	f, err := os.OpenFile(m.view("enc/vm.vswp"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := bytes.Repeat([]byte{0x5a}, 100000)
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := m.v.Unmount(true); err != nil {
		t.Fatalf("forced unmount: %v", err)
	}
	m.v.Wait()
	if isMounted(t, m.mnt) {
		t.Fatal("still mounted after a forced unmount")
	}
	// (Reads may still come from the page cache; fsync must reach us.)
	if err := f.Sync(); err == nil {
		t.Fatal("fsync through a file of an aborted mount succeeded")
	}
	// The container was closed cleanly: it opens and holds the data.
	c, err := container.OpenContainer(m.backing("enc/vm.vswp"), m.b.dek, true, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, len(data))
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data after forced unmount: %v", err)
	}
}

func isMounted(t *testing.T, mp string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && fields[4] == mp {
			return true
		}
	}
	return false
}

// TestCleanupStale kills a serving process with SIGKILL, which leaves a
// dead mount (ENOTCONN), and checks CleanupStale clears it so the view
// can be mounted there again.
func TestCleanupStale(t *testing.T) {
	requireFUSE(t)
	dir := t.TempDir()
	store, mnt := dir+"/store", dir+"/mnt"
	os.MkdirAll(store+"/enc", 0o755)
	os.MkdirAll(mnt, 0o755)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperMountProcess$")
	cmd.Env = append(os.Environ(), "FUSEFS_HELPER_MOUNT="+store+"|"+mnt)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		CleanupStale(mnt)
	})
	// Wait for the helper to say Mount returned: killed any earlier (while
	// go-fuse still probes its own mount), a process that is both server
	// and client of a mount can hang in exit.
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if sc.Text() == "HELPER-MOUNTED" {
				ready <- true
			}
		}
		close(ready)
		cmd.Wait()
		close(exited)
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatal("helper exited without mounting")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("helper did not mount")
	}
	cmd.Process.Kill()
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatal("killed helper did not exit")
	}
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(mnt, &sfs); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("statfs of a dead mount: %v, want ENOTCONN", err)
	}
	if cleaned, err := CleanupStale(mnt); err != nil || !cleaned {
		t.Fatalf("CleanupStale of a dead mount: cleaned %v, %v", cleaned, err)
	}
	if _, err := os.Stat(mnt); err != nil {
		t.Fatalf("after cleanup: %v", err)
	}
	// Mount checks for (and clears) a stale mount itself, too.
	b := newTestBackend(t, store)
	v, err := Mount(store, mnt, b, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Wait()
	defer v.Unmount(true)
	if err := os.WriteFile(mnt+"/enc/x", []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	// CleanupStale leaves a live mount alone.
	if cleaned, err := CleanupStale(mnt); err != nil || cleaned || !isMounted(t, mnt) {
		t.Fatalf("CleanupStale on a live mount: cleaned %v, %v", cleaned, err)
	}
}

// TestHelperMountProcess is not a test: TestCleanupStale runs the test
// binary with FUSEFS_HELPER_MOUNT set to have a process to kill.
func TestHelperMountProcess(t *testing.T) {
	spec := os.Getenv("FUSEFS_HELPER_MOUNT")
	if spec == "" {
		t.Skip("helper process for TestCleanupStale")
	}
	store, mnt, _ := strings.Cut(spec, "|")
	b := newTestBackend(t, store)
	if _, err := Mount(store, mnt, b, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}); err != nil {
		t.Fatal(err)
	}
	fmt.Println("HELPER-MOUNTED")
	select {} // until killed
}

// A plain file the backend refuses (MayOpen) (a VM being converted) cannot
// be opened: EBUSY, and nothing is written to it.
func TestGateRefusesPlainOpen(t *testing.T) {
	m := mountTest(t, Options{})
	if err := os.WriteFile(m.backing("vm.vmx"), []byte("a = \"1\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	m.b.mu.Lock()
	m.b.busy["vm.vmx"] = true
	m.b.mu.Unlock()
	_, err := os.OpenFile(m.view("vm.vmx"), os.O_WRONLY, 0)
	if !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("open of a busy plain file: %v, want EBUSY", err)
	}
	if err := os.Truncate(m.view("vm.vmx"), 0); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("truncate of a busy plain file: %v, want EBUSY", err)
	}
	// Name changes are refused too: a rename during an encrypt would keep
	// the plaintext original under its new name.
	m.b.mu.Lock()
	m.b.busy["new.vmx"] = true
	m.b.mu.Unlock()
	if err := os.WriteFile(m.backing("other"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(m.backing("busydir"), 0o755); err != nil {
		t.Fatal(err)
	}
	m.b.mu.Lock()
	m.b.busy["busydir"] = true
	m.b.mu.Unlock()
	for name, op := range map[string]func() error{
		"unlink":  func() error { return os.Remove(m.view("vm.vmx")) },
		"rename":  func() error { return os.Rename(m.view("vm.vmx"), m.view("other.vmx")) },
		"rename2": func() error { return os.Rename(m.view("other"), m.view("new.vmx")) },
		"link":    func() error { return os.Link(m.view("vm.vmx"), m.view("other.vmx")) },
		"symlink": func() error { return os.Symlink("x", m.view("new.vmx")) },
		"mkfifo":  func() error { return syscall.Mkfifo(m.view("new.vmx"), 0o644) },
		"rendir":  func() error { return os.Rename(m.view("busydir"), m.view("moved")) },
	} {
		if err := op(); !errors.Is(err, syscall.EBUSY) {
			t.Errorf("%s in a busy VM: %v, want EBUSY", name, err)
		}
	}
	if _, err := os.Stat(m.backing("vm.vmx")); err != nil {
		t.Fatalf("busy file gone: %v", err)
	}
	m.b.mu.Lock()
	delete(m.b.busy, "vm.vmx")
	delete(m.b.busy, "new.vmx")
	m.b.mu.Unlock()
	if err := os.WriteFile(m.view("vm.vmx"), []byte("a = \"2\"\n"), 0o644); err != nil {
		t.Fatalf("open after the conversion: %v", err)
	}
}

// A file the backend replaces when its last handle is flushed (a new
// VMDK descriptor becoming plain text): the next open, right after
// close(2) returns, sees the new file at its own size; a write through a
// duplicate of the old descriptor fails instead of landing in the
// unlinked container.
func TestSettleReplacesFile(t *testing.T) {
	m := mountTest(t, Options{})
	final := []byte("# Disk DescriptorFile\nencryptionKeys=\"...\"\nlonger than what was written\n")
	m.b.mu.Lock()
	m.b.settleTo["enc/d.vmdk"] = final
	m.b.mu.Unlock()
	f, err := os.Create(m.view("enc/d.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("# Disk DescriptorFile\n")); err != nil {
		t.Fatal(err)
	}
	dupFd, err := syscall.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	dup := os.NewFile(uintptr(dupFd), "dup")
	defer dup.Close()
	if err := f.Close(); err != nil { // FLUSH: settles
		t.Fatal(err)
	}
	got, err := os.ReadFile(m.view("enc/d.vmdk"))
	if err != nil || !bytes.Equal(got, final) {
		t.Fatalf("after settle the view serves %q, %v; want the replaced file", got, err)
	}
	if _, err := dup.WriteAt([]byte("late"), 0); err == nil {
		if err := dup.Sync(); err == nil {
			t.Fatal("a write through the old handle reached no error")
		}
	}
}

// A descriptor holding a disk's key lines is never cut in place (O_TRUNC,
// truncate, ftruncate): EPERM, content intact; writes that do not cut it
// and saves by rename still work.
func TestKeyLinesNotTruncated(t *testing.T) {
	m := mountTest(t, Options{})
	text := []byte("# Disk DescriptorFile\nencryptionKeys=\"...\"\n")
	if err := os.WriteFile(m.backing("d.vmdk"), text, 0o644); err != nil {
		t.Fatal(err)
	}
	m.b.mu.Lock()
	m.b.noTrunc["d.vmdk"] = true
	m.b.mu.Unlock()
	if _, err := os.OpenFile(m.view("d.vmdk"), os.O_WRONLY|os.O_TRUNC, 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("O_TRUNC open: %v, want EPERM", err)
	}
	if err := os.Truncate(m.view("d.vmdk"), 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("truncate: %v, want EPERM", err)
	}
	f, err := os.OpenFile(m.view("d.vmdk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(3); !errors.Is(err, syscall.EPERM) {
		t.Errorf("ftruncate: %v, want EPERM", err)
	}
	if _, err := f.WriteAt([]byte("#"), 0); err != nil {
		t.Errorf("write in place: %v", err)
	}
	f.Close()
	if got, _ := os.ReadFile(m.backing("d.vmdk")); !bytes.Equal(got, text) {
		t.Fatalf("descriptor changed: %q", got)
	}
	if err := os.WriteFile(m.view("d.vmdk.tmp"), text, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(m.view("d.vmdk.tmp"), m.view("d.vmdk")); err != nil {
		t.Errorf("save by rename: %v", err)
	}
}

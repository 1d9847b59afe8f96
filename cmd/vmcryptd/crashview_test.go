package main

import (
	"bufio"
	"crypto/rand"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// crashWriterEnv makes the test binary run crashWriter instead of tests.
const crashWriterEnv = "VMCRYPTD_TEST_CRASH_WRITER"

// crashPattern is the byte every write puts at position p, so the file's
// content is known from its size alone, whatever the history of writes.
func crashPattern(p int64) byte { return byte((p*2654435761)>>13) ^ byte(p>>20) }

func randN(n int64) int64 {
	v, _ := rand.Int(rand.Reader, big.NewInt(n))
	return v.Int64()
}

// crashWriter appends, overwrites and truncates an encrypted file through
// the view, fsyncing after each operation, until an error (the daemon was
// killed). Before each operation it logs its intent ("A off len", "W off
// len", "T size") and after each successful fsync "ok size", each line
// made durable before the next step.
func crashWriter(spec string) {
	path, logPath, _ := strings.Cut(spec, "|")
	lg, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		os.Exit(2)
	}
	say := func(format string, a ...any) {
		fmt.Fprintf(lg, format+"\n", a...)
		lg.Sync()
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		say("E %v", err)
		os.Exit(0)
	}
	st, err := f.Stat()
	if err != nil {
		os.Exit(0)
	}
	size := st.Size()
	fill := func(off, n int64) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = crashPattern(off + int64(i))
		}
		return b
	}
	for i := 0; i < 1_000_000; i++ {
		switch r := randN(100); {
		case r < 15 && size > 0 || size > 24<<20:
			to := size/2 + randN(size/2+1)
			say("T %d", to)
			if err := f.Truncate(to); err != nil {
				os.Exit(0)
			}
			size = to
		case r < 30 && size > 0:
			off := randN(size)
			n := 1 + randN(min(size-off, 300<<10))
			say("W %d %d", off, n)
			if _, err := f.WriteAt(fill(off, n), off); err != nil {
				os.Exit(0)
			}
		default:
			n := 1 + randN(256<<10)
			say("A %d %d", size, n)
			if _, err := f.WriteAt(fill(size, n), size); err != nil {
				os.Exit(0)
			}
			size += n
		}
		if err := f.Sync(); err != nil {
			os.Exit(0)
		}
		say("ok %d", size)
	}
}

// crashExpect reads a writer's log: the size of the last fsynced state
// and the range of sizes an unfinished last operation may leave.
func crashExpect(t *testing.T, logPath string) (committed, lo, hi int64) {
	t.Helper()
	f, err := os.Open(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var pending string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		switch fields[0] {
		case "ok":
			committed, _ = strconv.ParseInt(fields[1], 10, 64)
			pending = ""
		case "E":
			t.Fatalf("writer: %s", sc.Text())
		default:
			pending = sc.Text()
		}
	}
	lo, hi = committed, committed
	if f := strings.Fields(pending); len(f) > 0 {
		a, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "T":
			lo = min(lo, a)
			hi = max(hi, a)
		case "A":
			n, _ := strconv.ParseInt(f[2], 10, 64)
			hi = max(hi, a+n)
		}
	}
	return committed, lo, hi
}

// TestCrashViewWrites kills the daemon with SIGKILL while a writer
// appends, overwrites and truncates an encrypted file through the view
// with an fsync after each step (every fsync that changes the size is a
// header update). After each restart the file must read back through a
// new view at a size the log allows, with every byte up to the last
// fsynced size intact, and vm check must find no degraded container.
// make crash (VMCRYPTD_CRASH_ITER=50) runs the long campaign.
func TestCrashViewWrites(t *testing.T) {
	needView(t)
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "crashview")
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "crashview", "--encrypt")
	logPath := filepath.Join(t.TempDir(), "writer.log")
	const name = "crashview.vmss"
	self, _ := os.Executable()
	var mounts []string
	interrupted := 0
	t.Cleanup(func() {
		for _, mp := range mounts {
			syscall.Unmount(mp, syscall.MNT_DETACH)
		}
	})
	for i := 0; i < crashIterations(); i++ {
		mp := filepath.Join(dir, fmt.Sprintf("view%d", i))
		mustRun(t, "--socket", sock, "mount", "lab", mp)
		mounts = append(mounts, mp)
		w := exec.Command(self)
		w.Env = append(os.Environ(), crashWriterEnv+"="+filepath.Join(mp, "crashview", name)+"|"+logPath)
		if err := w.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200*time.Millisecond + randMillis(1500))
		syscall.Kill(readPID(filepath.Join(dir, "daemon.pid")), syscall.SIGKILL)
		done := make(chan error, 1)
		go func() { done <- w.Wait() }()
		for alive(filepath.Join(dir, "daemon.pid")) {
			time.Sleep(10 * time.Millisecond)
		}
		syscall.Unmount(mp, syscall.MNT_DETACH) // the dead daemon's mount
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			w.Process.Kill()
			t.Fatal("writer did not end after the daemon was killed")
		}
		restartDaemon(t, dir)

		committed, lo, hi := crashExpect(t, logPath)
		check := filepath.Join(dir, fmt.Sprintf("check%d", i))
		mustRun(t, "--socket", sock, "mount", "--read-only", "lab", check)
		mounts = append(mounts, check)
		got, err := os.ReadFile(filepath.Join(check, "crashview", name))
		mustRun(t, "--socket", sock, "unmount", check)
		if err != nil {
			t.Fatalf("kill %d: read back: %v", i, err)
		}
		size := int64(len(got))
		if size < lo || size > hi {
			t.Fatalf("kill %d: size %d, the log allows %d..%d (last fsync at %d)", i, size, lo, hi, committed)
		}
		for p := int64(0); p < size; p++ {
			if got[p] != crashPattern(p) && (p < min(committed, lo) || got[p] != 0) {
				t.Fatalf("kill %d: byte %d is %#x, want %#x (size %d, last fsync at %d)", i, p, got[p], crashPattern(p), size, committed)
			}
		}
		// A kill between the two slot writes of a header update leaves
		// them different (the newer one is used): that alone is allowed,
		// and --repair (or the next writable open) mirrors it.
		r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "check", vm)
		if r.code != 0 {
			if r.code != exitProblems || strings.Count(r.out, "\n") != 2 || !strings.Contains(r.out, "header slots differ") {
				t.Fatalf("kill %d: vm check: %d %s %s", i, r.code, r.out, r.err)
			}
			interrupted++
			mustRun(t, "--socket", sock, "vm", "check", "--repair", vm)
		}
		t.Logf("kill %d: size %d (last fsync at %d)", i, size, committed)
	}
	t.Logf("%d kills, %d of them between the two slot writes of a header update", crashIterations(), interrupted)
}

package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
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

// crashIterations is how many kill -9 points each operation gets. The
// default keeps `make test` short; VMCRYPTD_CRASH_ITER=50 (make crash)
// runs the long campaign.
func crashIterations() int {
	if n, err := strconv.Atoi(os.Getenv("VMCRYPTD_CRASH_ITER")); err == nil && n > 0 {
		return n
	}
	return 3
}

func hashFiles(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	out := map[string][32]byte{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = sha256.Sum256(raw)
	}
	return out
}

func randMillis(max int64) time.Duration {
	n, _ := rand.Int(rand.Reader, big.NewInt(max))
	return time.Duration(n.Int64()) * time.Millisecond
}

// restartDaemon starts the lab's daemon again after a kill -9.
func restartDaemon(t *testing.T, dir string) {
	t.Helper()
	startDaemon(t, filepath.Join(dir, "daemon.log"), filepath.Join(dir, "daemon.pid"), filepath.Join(dir, "vmcryptd.sock"), filepath.Join(dir, "vmcryptd.toml"))
}

// TestCrashResume kills the daemon with SIGKILL at random points of
// encrypt, deep rekey and decrypt of a multi-hundred-MiB VM; each time the
// same command run again must finish the job, and the VM must come back
// byte-identical.
func TestCrashResume(t *testing.T) {
	needBin(t, "qemu-img")
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "crashvm")
	os.MkdirAll(vm, 0o755)
	runCmd(t, vm, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "disk.vmdk", "256M")
	// Random data in most of the flat extent, holes elsewhere.
	f, _ := os.OpenFile(filepath.Join(vm, "disk-flat.vmdk"), os.O_RDWR, 0)
	buf := make([]byte, 1<<20)
	for i := 0; i < 192; i++ {
		rand.Read(buf)
		f.WriteAt(buf, int64(i)<<20)
	}
	f.Close()
	sw := make([]byte, 32<<20)
	rand.Read(sw)
	os.WriteFile(filepath.Join(vm, "crashvm.vswp"), sw, 0o600)
	os.WriteFile(filepath.Join(vm, "crashvm.nvram"), sw[:8684], 0o644)
	os.WriteFile(filepath.Join(vm, "crashvm.vmx"), []byte("displayName = \"crashvm\"\nguestinfo.secret = \"x\"\nnvram = \"crashvm.nvram\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"disk.vmdk\"\nsched.swap.derivedName = \"crashvm.vswp\"\n"), 0o644)
	want := hashFiles(t, vm)

	for _, op := range [][]string{{"vm", "encrypt", vm}, {"vm", "rekey", "--deep", vm}, {"vm", "decrypt", vm}} {
		for i := 0; i < crashIterations(); i++ {
			self, _ := os.Executable()
			cmd := exec.Command(self, append([]string{"--socket", sock}, append(op, "--json")...)...)
			cmd.Env = append(os.Environ(), asMainEnv+"=1")
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(randMillis(600))
			pid := readPID(filepath.Join(dir, "daemon.pid"))
			syscall.Kill(pid, syscall.SIGKILL)
			cmd.Wait()
			for alive(filepath.Join(dir, "daemon.pid")) {
				time.Sleep(10 * time.Millisecond)
			}
			restartDaemon(t, dir)
			st := labStatus(t, dir)
			interrupted := false
			for _, v := range st.VMs {
				if v.Dir == vm && strings.Contains(v.State, "conversion interrupted") {
					interrupted = true
				}
			}
			if _, err := os.Stat(filepath.Join(vm, ".vmcryptd-journal.json")); err == nil && !interrupted {
				t.Fatalf("%v: journal present but status does not say conversion interrupted: %+v", op, st.VMs)
			}
			// The VM may be mid-way; the next iteration (or the final run)
			// resumes. Every file must still be there, no temp left for
			// the next run to be confused by (the engine removes it).
			for name := range want {
				if _, err := os.Stat(filepath.Join(vm, name)); err != nil {
					t.Fatalf("%v kill %d: %s missing: %v", op, i, name, err)
				}
			}
		}
		// Finish: re-run unless the last kill came after completion (then
		// the VM is already in the target state and the command would
		// rightly refuse). A deep rekey is always safe to run once more.
		_, jerr := os.Stat(filepath.Join(vm, ".vmcryptd-journal.json"))
		encrypted := vmEncrypted(t, sock, vm)
		if jerr != nil && ((op[1] == "encrypt" && encrypted) || (op[1] == "decrypt" && !encrypted)) {
			continue
		}
		r := vmcryptd(t, nil, nil, append([]string{"--socket", sock}, op...)...)
		if r.code != 0 {
			t.Fatalf("%v after kills: %s %s", op, r.out, r.err)
		}
		if _, err := os.Stat(filepath.Join(vm, ".vmcryptd-journal.json")); err == nil {
			t.Fatalf("%v: journal left after completion", op)
		}
	}
	got := hashFiles(t, vm)
	for name, h := range want {
		if got[name] != h {
			t.Errorf("%s differs after the crash campaign", name)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("extra file %s left behind", name)
		}
	}
}

func needBin(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s not installed (make deps installs it)", name)
		}
		t.Skipf("%s not installed", name)
	}
}

func runCmd(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func vmEncrypted(t *testing.T, sock, vm string) bool {
	t.Helper()
	out := mustRun(t, "--socket", sock, "vm", "status", vm, "--json")
	return strings.Contains(out, `"encrypted": true`)
}

var _ = fmt.Sprint

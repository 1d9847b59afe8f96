package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Issue 12 case 7 end to end: an encrypt that fails half way (an
// immutable swap file) leaves the VM interrupted; decrypt is refused and
// points at --abort; `vm encrypt --abort` through the daemon rolls the VM
// back to its plain files, byte for byte, and the audit log records it.
func TestAbortThroughDaemon(t *testing.T) {
	needBin(t, "chattr")
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "abvm")
	os.MkdirAll(vm, 0o755)
	os.WriteFile(filepath.Join(vm, "abvm.vmx"), []byte("displayName = \"abvm\"\nnvram = \"abvm.nvram\"\nsched.swap.derivedName = \"abvm.vswp\"\nguestinfo.token = \"abc\"\n"), 0o644)
	os.WriteFile(filepath.Join(vm, "abvm.nvram"), bytes.Repeat([]byte("nvram "), 1500), 0o644)
	swap := filepath.Join(vm, "abvm.vswp")
	os.WriteFile(swap, bytes.Repeat([]byte("swap page "), 300000), 0o600)
	want := hashFiles(t, vm)
	runCmd(t, vm, "chattr", "+i", swap)
	t.Cleanup(func() { exec.Command("chattr", "-i", swap).Run() })

	if r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "encrypt", vm); r.code == 0 {
		t.Fatal("encrypt with an immutable swap file succeeded")
	}
	if nv, _ := os.ReadFile(filepath.Join(vm, "abvm.nvram")); !bytes.HasPrefix(nv, []byte("VMCRYPTD")) {
		t.Fatal("the failed encrypt converted nothing: the abort below would test nothing")
	}
	if out := mustRun(t, "--socket", sock, "vm", "status", vm); !strings.Contains(out, "conversion interrupted: encrypt") || !strings.Contains(out, "--abort") {
		t.Fatalf("status after the failure:\n%s", out)
	}
	if r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "decrypt", vm); r.code != exitInterrupted || !strings.Contains(r.err, "--abort") {
		t.Fatalf("decrypt of an interrupted encrypt: exit %d: %s", r.code, r.err)
	}
	if r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "decrypt", "--abort", vm); r.code == 0 {
		t.Fatal("decrypt --abort of an interrupted encrypt succeeded")
	}
	mustRun(t, "--socket", sock, "vm", "encrypt", "--abort", vm)
	got := hashFiles(t, vm)
	for name, h := range want {
		if got[name] != h {
			t.Errorf("%s differs after abort", name)
		}
	}
	if len(got) != len(want) {
		t.Errorf("file set after abort: %d files, want %d", len(got), len(want))
	}
	if out := mustRun(t, "--socket", sock, "vm", "status", vm); strings.Contains(out, "interrupted") || !strings.Contains(out, ": plain") {
		t.Fatalf("status after abort:\n%s", out)
	}
	audit, _ := os.ReadFile(filepath.Join(dir, "audit.log"))
	if !bytes.Contains(audit, []byte(`"op":"vm.encrypt.abort"`)) {
		t.Fatalf("audit log has no vm.encrypt.abort line:\n%s", audit)
	}
	// With the fault gone, the encryption runs from the start.
	runCmd(t, vm, "chattr", "-i", swap)
	mustRun(t, "--socket", sock, "vm", "encrypt", vm)
	mustRun(t, "--socket", sock, "vm", "decrypt", vm)
	for name, h := range want {
		if hashFiles(t, vm)[name] != h {
			t.Errorf("%s differs after encrypt and decrypt", name)
		}
	}
}

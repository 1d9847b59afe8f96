package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Issue 11 case 3 through a real view: disks made with qemu-img create
// through the view of an encrypted VM and never attached make vm decrypt
// refuse (naming them) with nothing changed, where it used to report
// success and strand them; once attached, the decrypt gives their data
// back in plain. Issue 12 case 4 through the same view: a plain file in
// place of the nvram is refused (EACCES), reported and stops decrypt.
func TestViewMadeDisksAndDowngradeThroughDaemon(t *testing.T) {
	needView(t)
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "vv")
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "vv", "--disk", "4M", "--encrypt")
	mp := filepath.Join(dir, "view")
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	t.Cleanup(func() { vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp) })
	view := filepath.Join(mp, "vv")
	runCmd(t, view, "qemu-img", "create", "-q", "-f", "vmdk", "new.vmdk", "4M")
	runCmd(t, view, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "4M")
	for _, d := range []string{"new.vmdk", "flat.vmdk"} {
		runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 1M 512k", d)
	}
	mustRun(t, "--socket", sock, "unmount", mp)
	for _, f := range []string{"new.vmdk", "flat-flat.vmdk"} {
		if raw, _ := os.ReadFile(filepath.Join(vm, f)); !strings.HasPrefix(string(raw), "VMCRYPTD") {
			t.Fatalf("%s made through the view is not a container at rest", f)
		}
	}

	before := hashFiles(t, vm)
	r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "decrypt", vm)
	if r.code == 0 || !strings.Contains(r.err, "new.vmdk") || !strings.Contains(r.err, "flat-flat.vmdk") {
		t.Fatalf("decrypt with unattached view-made disks: exit %d: %s", r.code, r.err)
	}
	after := hashFiles(t, vm)
	for name, h := range before {
		if after[name] != h {
			t.Errorf("%s changed by the refused decrypt", name)
		}
	}
	if len(after) != len(before) {
		t.Errorf("refused decrypt changed the file set: %d files, was %d", len(after), len(before))
	}
	if out := mustRun(t, "--socket", sock, "vm", "status", vm); strings.Contains(out, "interrupted") || !strings.Contains(out, ": encrypted") {
		t.Fatalf("status after the refused decrypt:\n%s", out)
	}
	for _, d := range []string{"new.vmdk", "flat.vmdk"} {
		mustRun(t, "--socket", sock, "disk", "attach", vm, d)
	}
	mustRun(t, "--socket", sock, "vm", "decrypt", vm)
	for _, d := range []string{"new.vmdk", "flat.vmdk"} {
		runCmd(t, vm, "qemu-io", "-f", "vmdk", "-c", "read -P 0x5a 1M 512k", "-c", "read -P 0 0 1M", d)
	}

	// A plain nvram where the encrypted VM's container belongs.
	vm2 := filepath.Join(dir, "datastore", "dg")
	mustRun(t, "--socket", sock, "vm", "create", vm2, "--name", "dg", "--encrypt")
	nv := filepath.Join(vm2, "dg.nvram")
	if err := os.WriteFile(nv, []byte("plain bytes where a container belongs"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	if _, err := os.ReadFile(filepath.Join(mp, "dg", "dg.nvram")); !errors.Is(err, syscall.EACCES) && !errors.Is(err, syscall.EIO) {
		t.Fatalf("reading a plain file in a container's place through the view: %v, want EACCES or EIO", err)
	}
	mustRun(t, "--socket", sock, "unmount", mp)
	if out := mustRun(t, "--socket", sock, "vm", "status", vm2); !strings.Contains(out, "problem: dg.nvram: not a valid container") {
		t.Fatalf("status does not report the plain nvram:\n%s", out)
	}
	if r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "decrypt", vm2); r.code == 0 || !strings.Contains(r.err, nv) {
		t.Fatalf("decrypt with a plain nvram: exit %d: %s", r.code, r.err)
	}
	if raw, _ := os.ReadFile(nv); string(raw) != "plain bytes where a container belongs" {
		t.Fatal("the refused decrypt changed the nvram")
	}
}

package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestViewThroughDaemon mounts the decrypted view of a lab datastore and
// uses it with the real qemu tools.
func TestViewThroughDaemon(t *testing.T) {
	needBin(t, "qemu-img")
	needBin(t, "qemu-io")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("/dev/fuse missing")
		}
		t.Skip("/dev/fuse missing")
	}
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "viewvm")
	orig := t.TempDir()
	os.MkdirAll(vm, 0o755)
	for _, sf := range []string{"monolithicFlat", "monolithicSparse"} {
		name := "d-" + sf + ".vmdk"
		runCmd(t, vm, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sf, name, "16M")
		runCmd(t, vm, "qemu-io", "-f", "vmdk", "-c", "write -P 0x3c 0 2M", "-c", "write -P 0x7e 9M 512k", name)
	}
	os.WriteFile(filepath.Join(vm, "viewvm.vmx"), []byte("displayName = \"viewvm\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"d-monolithicFlat.vmdk\"\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"d-monolithicSparse.vmdk\"\n"), 0o644)
	runCmd(t, vm, "cp", "-a", ".", orig)
	mustRun(t, "--socket", sock, "vm", "encrypt", vm)

	mp := filepath.Join(dir, "view")
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	t.Cleanup(func() { vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp) })
	view := filepath.Join(mp, "viewvm")
	for _, sf := range []string{"monolithicFlat", "monolithicSparse"} {
		name := "d-" + sf + ".vmdk"
		runCmd(t, orig, "qemu-img", "compare", "-q", filepath.Join(orig, name), filepath.Join(view, name))
	}
	runCmd(t, view, "qemu-img", "check", "-q", "d-monolithicSparse.vmdk")
	// A write through the view lands encrypted at rest.
	runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "write -P 0xcd 4M 1M", "d-monolithicFlat.vmdk")
	runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "read -P 0xcd 4M 1M", "d-monolithicFlat.vmdk")
	raw, _ := os.ReadFile(filepath.Join(vm, "d-monolithicFlat-flat.vmdk"))
	if bytes.Contains(raw, bytes.Repeat([]byte{0xcd}, 64)) || bytes.Contains(raw, bytes.Repeat([]byte{0x3c}, 64)) {
		t.Fatal("plaintext pattern found at rest")
	}
	// In use: a file open through the view blocks decrypt and unmount.
	f, err := os.Open(filepath.Join(view, "d-monolithicFlat-flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "decrypt", vm)
	if r.code == 0 || !strings.Contains(r.err, "in use") {
		t.Fatalf("decrypt with an open file: %d %s", r.code, r.err)
	}
	r = vmcryptd(t, nil, nil, "--socket", sock, "unmount", mp)
	if r.code == 0 || !strings.Contains(r.err, "d-monolithicFlat-flat.vmdk") {
		t.Fatalf("unmount with an open file: %d %s", r.code, r.err)
	}
	f.Close()
	mustRun(t, "--socket", sock, "unmount", mp)
	// After decrypt the files equal the originals except for the bytes
	// qemu-io wrote through the view.
	mustRun(t, "--socket", sock, "vm", "decrypt", vm)
	runCmd(t, vm, "qemu-io", "-f", "vmdk", "-c", "read -P 0xcd 4M 1M", "-c", "read -P 0x3c 0 2M", "d-monolithicFlat.vmdk")
	got, _ := os.ReadFile(filepath.Join(vm, "d-monolithicSparse.vmdk"))
	want, _ := os.ReadFile(filepath.Join(orig, "d-monolithicSparse.vmdk"))
	if !bytes.Equal(got, want) {
		t.Fatal("sparse disk differs after encrypt, view, decrypt")
	}
}

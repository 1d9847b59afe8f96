package enginetest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
)

func TestVMCreateAddAttach(t *testing.T) {
	needTool(t, "qemu-img")
	ops, kek := newTestOps(t)
	host, err := ops.Keys.Create(context.Background(), "mem", "host")
	if err != nil {
		t.Fatal(err)
	}
	ops.HostKEK = &host.Ref
	ctx := context.Background()
	root := t.TempDir()

	enc := filepath.Join(root, "encvm")
	spec := vmops.CreateSpec{Name: "encvm", Memory: 2 << 30, Encrypt: true, KEK: kek,
		Disks: []vmops.DiskSpec{{Size: 64 << 20}, {Size: 32 << 20, Subformat: "monolithicSparse"}}}
	if err := ops.Create(ctx, enc, spec); err != nil {
		t.Fatal(err)
	}
	if m, _ := filepath.Glob(filepath.Join(root, ".encvm.vmcryptd-creating-*")); len(m) > 0 {
		t.Fatal("staging directory left behind")
	}
	st, err := vm.ReadVMStatus(enc, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Encrypted || len(st.Files) != 3 {
		t.Fatalf("status: %+v", st)
	}
	for _, f := range st.Files {
		if !f.Encrypted {
			t.Errorf("%s not encrypted", f.Name)
		}
	}
	vmxText, _ := os.ReadFile(filepath.Join(enc, "encvm.vmx"))
	if !strings.Contains(string(vmxText), `memSize = "2048"`) {
		t.Errorf("vmx: %s", vmxText)
	}

	// Add a disk to the encrypted VM: it is encrypted with its own key.
	name, err := ops.AddDisk(ctx, enc, vmops.DiskSpec{Size: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	st, _ = vm.ReadVMStatus(enc, nil)
	fps := map[string]bool{}
	for _, f := range st.Files {
		if !f.Encrypted {
			t.Errorf("%s not encrypted after disk add", f.Name)
		}
		fps[f.Fingerprint] = true
	}
	if len(fps) != 4 || name != "encvm_2.vmdk" { // VM key + three disk keys
		t.Fatalf("added %s; fingerprints %v", name, fps)
	}

	// A plain VM with a plain disk; then attach rules.
	plain := filepath.Join(root, "plainvm")
	if err := ops.Create(ctx, plain, vmops.CreateSpec{Name: "plainvm", Disks: []vmops.DiskSpec{{Size: 8 << 20}}}); err != nil {
		t.Fatal(err)
	}
	// Copy an encrypted disk (descriptor + extent) into the plain VM.
	for _, f := range []string{"encvm_2.vmdk", "encvm_2-flat.vmdk"} {
		raw, _ := os.ReadFile(filepath.Join(enc, f))
		os.WriteFile(filepath.Join(plain, f), raw, 0o644)
	}
	if _, err := ops.AttachDisk(ctx, plain, "encvm_2.vmdk", true); !errors.Is(err, vmops.ErrEncryptedDiskOnPlainVM) {
		t.Fatalf("attach encrypted disk to plain VM: %v", err)
	}
	// A plain disk joins an encrypted VM and stays plain.
	cmd := exec.Command("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "extra.vmdk", "4M")
	cmd.Dir = enc
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	// Without crypto rights it is refused: a plain disk in an encrypted
	// VM keeps that VM's guest data in plaintext.
	if _, err := ops.AttachDisk(ctx, enc, "extra.vmdk", false); !errors.Is(err, vmops.ErrAttachEncrypted) {
		t.Fatalf("attach plain disk to encrypted VM without crypto rights: %v", err)
	}
	encd, err := ops.AttachDisk(ctx, enc, "extra.vmdk", true)
	if err != nil || encd {
		t.Fatalf("attach plain disk to encrypted VM: %v %v", encd, err)
	}
	// An encrypted disk (another VM's, copied in) needs crypto rights:
	// attaching it puts a key into the VM.
	for _, f := range []string{"encvm_2.vmdk", "encvm_2-flat.vmdk"} {
		raw, _ := os.ReadFile(filepath.Join(enc, f))
		os.WriteFile(filepath.Join(enc, strings.Replace(f, "encvm_2", "copied", 1)), bytes.Replace(raw, []byte("encvm_2-flat"), []byte("copied-flat"), 1), 0o644)
	}
	if _, err := ops.AttachDisk(ctx, enc, "copied.vmdk", false); !errors.Is(err, vmops.ErrAttachEncrypted) {
		t.Fatalf("attach encrypted disk without crypto rights: %v", err)
	}
	st, _ = vm.ReadVMStatus(enc, nil)
	for _, f := range st.Files {
		if f.Name == "extra-flat.vmdk" && f.Encrypted {
			t.Fatal("plain disk became encrypted")
		}
	}

	// A core dump found in the VM is encrypted with the host key and
	// comes back on decrypt.
	dump := bytes.Repeat([]byte("core dump "), 10000)
	os.WriteFile(filepath.Join(plain, "vmware-vmx-1234.core"), dump, 0o600)
	os.WriteFile(filepath.Join(plain, "crash-1.dmp"), dump, 0o600) // a configured pattern
	ops.CoreDumpPatterns = []string{"*.dmp"}
	if err := ops.Encrypt(ctx, plain, kek); err != nil {
		t.Fatal(err)
	}
	st, _ = vm.ReadVMStatus(plain, ops.CoreDumpPatterns)
	found := 0
	for _, f := range st.Files {
		if f.Kind == "coredump" {
			found++
			if !f.Encrypted || f.KEK != host.Ref.String() {
				t.Fatalf("core dump: %+v", f)
			}
		}
	}
	if found != 2 {
		t.Fatalf("%d core dumps listed, want 2", found)
	}
	// The encrypted disk copied in (never attached) would be left behind
	// by a decrypt: refused, naming it, until it is moved away.
	if err := ops.Decrypt(ctx, plain); err == nil || !strings.Contains(err.Error(), "encvm_2-flat.vmdk") {
		t.Fatalf("decrypt with an unattached encrypted disk: %v", err)
	}
	if _, err := os.Stat(filepath.Join(plain, vm.JournalName)); err == nil {
		t.Fatal("refused decrypt left a journal")
	}
	os.Remove(filepath.Join(plain, "encvm_2-flat.vmdk"))
	if err := ops.Decrypt(ctx, plain); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"vmware-vmx-1234.core", "crash-1.dmp"} {
		if got, _ := os.ReadFile(filepath.Join(plain, n)); !bytes.Equal(got, dump) {
			t.Fatalf("core dump %s differs after decrypt", n)
		}
	}
}

func TestCreateLimits(t *testing.T) {
	mem := []struct {
		n  int64
		ok bool
	}{
		{0, true}, {vmops.MinMemory, true}, {1 << 30, true}, {vmops.MaxMemory, true},
		{-1, false}, {-(1 << 30), false}, {1 << 20, false}, {vmops.MaxMemory + 1<<20, false}, {1 << 62, false}, {(1 << 30) + 512, false},
	}
	for _, tc := range mem {
		if err := vmops.CheckMemory(tc.n); (err == nil) != tc.ok {
			t.Errorf("CheckMemory(%d) = %v, want ok %v", tc.n, err, tc.ok)
		}
	}
	disk := []struct {
		n  int64
		ok bool
	}{
		{512, true}, {8 << 30, true}, {vmops.MaxDiskSize, true},
		{0, false}, {-512, false}, {1000, false}, {vmops.MaxDiskSize + 512, false}, {1 << 62, false},
	}
	for _, tc := range disk {
		if err := vmops.CheckDiskSize(tc.n); (err == nil) != tc.ok {
			t.Errorf("CheckDiskSize(%d) = %v, want ok %v", tc.n, err, tc.ok)
		}
	}
	// Create refuses before it touches the disk.
	dir := filepath.Join(t.TempDir(), "vm")
	for _, spec := range []vmops.CreateSpec{{Name: "v", Memory: -1}, {Name: "v", Memory: 1 << 62}, {Name: "v", Disks: []vmops.DiskSpec{{Size: 1 << 62}}}} {
		if err := (&vmops.VMOps{}).Create(context.Background(), dir, spec); err == nil {
			t.Errorf("Create(%+v) accepted", spec)
		}
		if _, err := os.Lstat(dir); err == nil {
			t.Fatalf("Create(%+v) left %s", spec, dir)
		}
	}
}

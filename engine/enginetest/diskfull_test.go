package enginetest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/internal/testkit"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"golang.org/x/sys/unix"
)

// A conversion that runs out of space stops with ENOSPC and leaves the VM
// as it was: the original files intact, no temporary file, and the same
// command works once there is room.
func TestEncryptDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	mnt := t.TempDir()
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=24m"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	dir := filepath.Join(mnt, "vm")
	os.Mkdir(dir, 0o755)
	swap := testkit.RandBytes(14 << 20) // the copy needs another 14 MiB: no room
	os.WriteFile(filepath.Join(dir, "vm.vswp"), swap, 0o600)
	nv := testkit.RandBytes(8684)
	os.WriteFile(filepath.Join(dir, "vm.nvram"), nv, 0o644)
	vmxText := []byte("displayName = \"vm\"\nnvram = \"vm.nvram\"\nsched.swap.derivedName = \"vm.vswp\"\n")
	os.WriteFile(filepath.Join(dir, "vm.vmx"), vmxText, 0o644)

	ops, kek := newTestOps(t)
	err := ops.Encrypt(context.Background(), dir, kek)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("encrypt on a full disk: %v, want ENOSPC", err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "vm.vswp")); !bytes.Equal(got, swap) {
		t.Fatal("swap file changed")
	}
	noTemps(t, dir)
	if got, _ := os.ReadFile(filepath.Join(dir, "vm.vmx")); !bytes.Equal(got, vmxText) {
		t.Fatal("vmx changed")
	}
	// Issue 12 case 7: the disk is still full, and --abort rolls the
	// half-done encryption (the nvram is a container now) back.
	if raw, _ := os.ReadFile(filepath.Join(dir, "vm.nvram")); bytes.Equal(raw, nv) {
		t.Fatal("nvram not converted before the disk filled up: the abort would test nothing")
	}
	if err := ops.Abort(context.Background(), dir, "encrypt"); err != nil {
		t.Fatalf("abort on the full disk: %v", err)
	}
	for name, want := range map[string][]byte{"vm.nvram": nv, "vm.vswp": swap, "vm.vmx": vmxText} {
		if got, _ := os.ReadFile(filepath.Join(dir, name)); !bytes.Equal(got, want) {
			t.Fatalf("%s differs after abort", name)
		}
	}
	if op, _ := vm.InterruptedOp(dir); op != "" {
		t.Fatalf("still interrupted (%s) after abort", op)
	}
	noTemps(t, dir)
	// The same encryption then fails the same way, and resumes once
	// there is room.
	if err := ops.Encrypt(context.Background(), dir, kek); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("encrypt again on the full disk: %v", err)
	}
	// Make room (a bigger tmpfs) and run the same command: it resumes.
	if err := unix.Mount("tmpfs", mnt, "tmpfs", unix.MS_REMOUNT, "size=64m"); err != nil {
		t.Fatal(err)
	}
	if err := ops.Encrypt(context.Background(), dir, kek); err != nil {
		t.Fatal(err)
	}
	if err := ops.Decrypt(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "vm.vswp")); !bytes.Equal(got, swap) {
		t.Fatal("swap differs after encrypt and decrypt")
	}
}

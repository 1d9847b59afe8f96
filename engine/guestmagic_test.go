package engine

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// A guest may write anything at the start of its disk, including a
// vmcryptd header copied from a real container. That must neither lock
// the disk in a view nor block encrypting and decrypting the VM.
func TestGuestWrittenMagic(t *testing.T) {
	ops, kek := newTestOps(t)
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "vm")
	if err := ops.Create(ctx, dir, CreateSpec{Name: "vm", Disks: []DiskSpec{{Size: 1 << 20}}}); err != nil {
		t.Fatal(err)
	}
	// A real container's first 4 KiB, written as guest data.
	other := filepath.Join(t.TempDir(), "c")
	c, err := CreateContainer(other, mustDEK(t), CreateOptions{Kind: KindExtent, Binding: Binding{PurposeDisk, "x"}})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	fake, _ := os.ReadFile(other)
	flat := filepath.Join(dir, "vm-flat.vmdk")
	f, _ := os.OpenFile(flat, os.O_RDWR, 0)
	f.WriteAt(fake[:4096], 0)
	f.Close()
	want, _ := os.ReadFile(flat)

	ds := NewDatastore(filepath.Dir(dir), ops.Keys, "")
	defer ds.Close()
	if st, reason, err := ds.Classify("vm/vm-flat.vmdk"); err != nil || st != FilePlain {
		t.Fatalf("classify: %v %q %v, want plain", st, reason, err)
	}
	if err := ops.Encrypt(ctx, dir, kek); err != nil {
		t.Fatal(err)
	}
	if st, _, _ := ds.Classify("vm/vm-flat.vmdk"); st != FileEncrypted {
		t.Fatalf("after encrypt: %v", st)
	}
	if err := ops.Decrypt(ctx, dir); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(flat); !bytes.Equal(got, want) {
		t.Fatal("disk differs after encrypt and decrypt")
	}
}

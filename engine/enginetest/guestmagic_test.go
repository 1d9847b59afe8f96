package enginetest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/internal/testkit"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
)

// A guest may write anything at the start of its disk, including a
// vmcryptd header copied from a real container. That must neither lock
// the disk in a view nor block encrypting and decrypting the VM.
func TestGuestWrittenMagic(t *testing.T) {
	ops, kek := newTestOps(t)
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "vm")
	if err := ops.Create(ctx, dir, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 1 << 20}}}); err != nil {
		t.Fatal(err)
	}
	// A real container's first 4 KiB, written as guest data.
	other := filepath.Join(t.TempDir(), "c")
	c, err := container.CreateContainer(other, testkit.MustDEK(t), container.CreateOptions{Kind: container.KindExtent, Binding: keys.Binding{Purpose: keys.PurposeDisk, OwnerID: "x"}})
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

	ds := view.NewDatastore(filepath.Dir(dir), ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	if st, reason, err := ds.Classify("vm/vm-flat.vmdk"); err != nil || st != view.FilePlain {
		t.Fatalf("classify: %v %q %v, want plain", st, reason, err)
	}
	if err := ops.Encrypt(ctx, dir, kek); err != nil {
		t.Fatal(err)
	}
	if st, _, _ := ds.Classify("vm/vm-flat.vmdk"); st != view.FileEncrypted {
		t.Fatalf("after encrypt: %v", st)
	}
	if err := ops.Decrypt(ctx, dir); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(flat); !bytes.Equal(got, want) {
		t.Fatal("disk differs after encrypt and decrypt")
	}
}

// A guest can also write another disk's whole container, keySafe copy
// included (ciphertext from a backup), into its own plain disk. The host
// holds the KEK that opens that copy, so trusting it would decrypt the
// other VM's data for this guest. A plain disk is never decrypted: in a
// plain VM and in an encrypted one, in the view and in every VM
// operation.
func TestForeignCiphertextInPlainDisk(t *testing.T) {
	ops, kek := newTestOps(t)
	ctx := context.Background()
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	if _, ok := container.ReadEmbeddedKeySafe(cipher); !ok {
		t.Fatal("victim extent has no keySafe copy: the attack below would not test anything")
	}

	plainVM := filepath.Join(root, "plainvm")
	if err := ops.Create(ctx, plainVM, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 2 << 20}}}); err != nil {
		t.Fatal(err)
	}
	encVM := filepath.Join(root, "encvm")
	if err := ops.Create(ctx, encVM, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 1 << 20}}, Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	needTool(t, "qemu-img")
	run(t, encVM, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "p.vmdk", "2M")
	if enc, err := ops.AttachDisk(ctx, encVM, "p.vmdk", true); err != nil || enc {
		t.Fatalf("attach plain disk: %v %v", enc, err)
	}
	plant := func(p string) []byte {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt(cipher, 0) // what the guest writes to its disk
		f.Close()
		raw, _ := os.ReadFile(p)
		return raw
	}
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	for _, rel := range []string{"plainvm/vm-flat.vmdk", "encvm/p-flat.vmdk"} {
		want := plant(filepath.Join(root, rel))
		// Never decrypted; refused, since it also looks like an encrypted
		// disk that lost its key lines (whose only copy must not be
		// overwritten as plain data).
		if st, reason, err := ds.Classify(rel); err != nil || st != view.FileLocked || !strings.Contains(reason, "no encryptionKeys line") {
			t.Errorf("%s: classified %v %q %v, want locked", rel, st, reason, err)
		}
		var ref *vm.RefusedError
		if c, err := ds.Open(rel, true); !errors.As(err, &ref) || ref.Clause != vm.ClauseLostKeyLines {
			if c != nil {
				c.Close()
			}
			t.Errorf("%s: Open = %v, want refused by %s", rel, err, vm.ClauseLostKeyLines)
		}
		// No automatic restore either: only an explicit one, which a
		// plain VM refuses.
		if rel == "plainvm/vm-flat.vmdk" {
			if _, err := ops.RestoreDiskKeys(ctx, plainVM, "vm.vmdk"); !errors.Is(err, vmops.ErrEncryptedDiskOnPlainVM) {
				t.Errorf("restore-keys on a plain VM: %v", err)
			}
		}
		st, err := vm.ReadVMStatus(filepath.Join(root, filepath.Dir(rel)), nil)
		if err != nil || len(st.Problems) != 1 || !strings.Contains(st.Problems[0], "or guest data that looks like one") {
			t.Errorf("%s: status problems %q %v", rel, st.Problems, err)
		}
		if rel == "encvm/p-flat.vmdk" {
			if err := ops.RekeyShallow(ctx, encVM, kek); err != nil {
				t.Fatal(err)
			}
			// A decrypt would leave a container behind (it cannot tell
			// guest data from a disk that lost its key lines): refused,
			// naming it, and nothing changes.
			if err := ops.Decrypt(ctx, encVM); err == nil || !strings.Contains(err.Error(), "p-flat.vmdk: an encrypted container") {
				t.Fatalf("decrypt of a VM whose plain disk holds a container: %v", err)
			}
		} else if err := ops.Encrypt(ctx, plainVM, kek); err == nil || !strings.Contains(err.Error(), "vm-flat.vmdk: already encrypted") {
			// A real container (its copy opens it) is never wrapped in
			// another: it is what a disk that lost its key lines looks
			// like, so the encryption is refused and nothing changes.
			t.Fatalf("encrypt of a VM whose disk holds a real container: %v", err)
		} else if _, err := os.Stat(filepath.Join(plainVM, vm.JournalName)); err == nil {
			t.Fatal("refused encrypt left a journal")
		}
		if got, _ := os.ReadFile(filepath.Join(root, rel)); !bytes.Equal(got, want) {
			t.Errorf("%s: the guest's bytes changed through VM operations (victim plaintext: %v)", rel, bytes.HasPrefix(got, secret))
		}
	}
}

// restore-keys adopts only a copy wrapped by a KEK the VM itself uses:
// a planted disk of a VM under another KEK is never adopted, even when an
// administrator follows vm status's hint.
func TestRestoreKeysRefusesForeignKEK(t *testing.T) {
	ops, kek := newTestOps(t)
	ctx := context.Background()
	other, err := ops.Keys.Create(ctx, "mem", "other")
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	victim := filepath.Join(root, "victim")
	if err := ops.Create(ctx, victim, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 1 << 20}}, Encrypt: true, KEK: other.Ref}); err != nil {
		t.Fatal(err)
	}
	cipher, _ := os.ReadFile(filepath.Join(victim, "vm-flat.vmdk"))
	enc := filepath.Join(root, "enc")
	if err := ops.Create(ctx, enc, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 1 << 20}, {Size: 2 << 20}}, Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	// Make the second disk plain (as if attached plain), then plant.
	if err := os.WriteFile(filepath.Join(enc, "vm_1-flat.vmdk"), cipher, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := vmops.EditDescriptor(filepath.Join(enc, "vm_1.vmdk"), func(d *vmdk.Descriptor) error {
		d.Delete(vm.DescKeySafe)
		d.Delete(vm.DDBDiskID)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := ops.RestoreDiskKeys(ctx, enc, "vm_1.vmdk"); err == nil || !strings.Contains(err.Error(), "not wrapped by a KEK of this VM") {
		t.Fatalf("restore-keys of a disk under another VM's KEK: %v", err)
	}
}

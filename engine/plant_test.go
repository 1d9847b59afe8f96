package engine

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// victimCipher makes an encrypted VM whose disk holds a secret and
// returns its extent's ciphertext (what a guest could get from a backup).
func victimCipher(t *testing.T, ops *VMOps, kek KeyRef, root string) ([]byte, []byte) {
	t.Helper()
	ctx := context.Background()
	victim := filepath.Join(root, "victim")
	if err := ops.Create(ctx, victim, CreateSpec{Name: "vm", Disks: []DiskSpec{{Size: 1 << 20}}}); err != nil {
		t.Fatal(err)
	}
	secret := bytes.Repeat([]byte("victim secret "), 1000)
	if err := os.WriteFile(filepath.Join(victim, "vm-flat.vmdk"), append(secret, make([]byte, 1<<20-len(secret))...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := ops.Encrypt(ctx, victim, kek); err != nil {
		t.Fatal(err)
	}
	cipher, _ := os.ReadFile(filepath.Join(victim, "vm-flat.vmdk"))
	return cipher, secret
}

func plant(t *testing.T, p string, cipher []byte) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(cipher, 0); err != nil { // the guest writes its disk
		t.Fatal(err)
	}
}

func leaks(t *testing.T, ds *Datastore, rel string, secret []byte) bool {
	t.Helper()
	st, why, err := ds.Classify(rel)
	t.Logf("%s: Classify = %v %q %v", rel, st, why, err)
	c, err := ds.Open(rel, true)
	if err != nil {
		t.Logf("%s: Open: %v", rel, err)
		return false
	}
	defer c.Close()
	buf := make([]byte, len(secret))
	c.ReadAt(buf, 0)
	return bytes.Equal(buf, secret)
}

// Any layout error (here a stale, absent vmx disk entry; also an
// absolute path, a subdirectory, two .vmx, a parentCID mismatch...) makes
// layoutVerdict trust the header and its keySafe copy for every file of
// the VM directory.
func TestPlantedLayoutErrorFailsOpen(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	for _, extra := range []string{
		"scsi0:1.present = \"FALSE\"\nscsi0:1.fileName = \"removed.vmdk\"\n",
		"scsi0:2.present = \"TRUE\"\nscsi0:2.fileName = \"/vmfs/volumes/ds2/shared/data.vmdk\"\n",
	} {
		name := "plain" + string(rune('a'+len(extra)%26))
		dir := filepath.Join(root, name)
		if err := ops.Create(context.Background(), dir, CreateSpec{Name: "vm", Disks: []DiskSpec{{Size: 2 << 20}}}); err != nil {
			t.Fatal(err)
		}
		vmxp := filepath.Join(dir, "vm.vmx")
		raw, _ := os.ReadFile(vmxp)
		os.WriteFile(vmxp, append(raw, extra...), 0o644)
		plant(t, filepath.Join(dir, "vm-flat.vmdk"), cipher)
		ds := NewDatastore(root, ops.Keys, "")
		if leaks(t, ds, name+"/vm-flat.vmdk", secret) {
			t.Errorf("plain VM with vmx line %q: guest's plain disk served as the victim's plaintext", extra)
		}
		ds.Close()
	}
}

// A directory without a vmx (a disk kept beside, not inside, its VM:
// shared-disk folders, a second datastore): only core dumps open there.
func TestPlantedOutsideVMDirFailsOpen(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	shared := filepath.Join(root, "shared")
	os.MkdirAll(shared, 0o755)
	os.WriteFile(filepath.Join(shared, "data-flat.vmdk"), make([]byte, 2<<20), 0o644)
	plant(t, filepath.Join(shared, "data-flat.vmdk"), cipher)
	ds := NewDatastore(root, ops.Keys, "")
	defer ds.Close()
	if leaks(t, ds, "shared/data-flat.vmdk", secret) {
		t.Error("plain disk outside a VM directory served as the victim's plaintext")
	}
}

// A guest-writable file that is not a hard disk (floppy image) in an
// encrypted VM is plain data, whatever it holds.
func TestPlantedFloppyInEncryptedVM(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	dir := filepath.Join(root, "enc")
	if err := ops.Create(context.Background(), dir, CreateSpec{Name: "vm", Disks: []DiskSpec{{Size: 1 << 20}}, Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	vmxp := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(vmxp)
	os.WriteFile(vmxp, append(raw, "floppy0.present = \"TRUE\"\nfloppy0.fileType = \"file\"\nfloppy0.fileName = \"data.flp\"\n"...), 0o644)
	ds := NewDatastore(root, ops.Keys, "")
	defer ds.Close()
	if enc, _ := ds.WouldEncrypt("enc/data.flp"); enc {
		t.Fatal("floppy would be created encrypted; scenario void")
	}
	os.WriteFile(filepath.Join(dir, "data.flp"), make([]byte, 2<<20), 0o644) // created plain (view or host)
	plant(t, filepath.Join(dir, "data.flp"), cipher)
	if leaks(t, ds, "enc/data.flp", secret) {
		t.Error("floppy image of an encrypted VM served as the victim's plaintext")
	}
}

// The vmx names a flat file directly: a container there is refused, never
// taken as an embedded-descriptor disk.
func TestPlantedVMXNamesFlatDirectly(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	dir := filepath.Join(root, "rawvm")
	if err := ops.Create(context.Background(), dir, CreateSpec{Name: "vm", Disks: []DiskSpec{{Size: 2 << 20}}}); err != nil {
		t.Fatal(err)
	}
	vmxp := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(vmxp)
	raw = bytes.Replace(raw, []byte(`fileName = "vm.vmdk"`), []byte(`fileName = "vm-flat.vmdk"`), 1)
	os.WriteFile(vmxp, raw, 0o644)
	plant(t, filepath.Join(dir, "vm-flat.vmdk"), cipher)
	ds := NewDatastore(root, ops.Keys, "")
	defer ds.Close()
	l, err := loadLayout(dir, nil)
	if err == nil {
		t.Logf("layout: encrypted VM=%v disk %s keySafe set=%v", l.Encrypted, l.Disks[0].Name, l.Disks[0].KeySafe != "")
	}
	if leaks(t, ds, "rawvm/vm-flat.vmdk", secret) {
		t.Error("plain VM naming its flat extent directly: served as the victim's plaintext")
	}
}

// Same, in an encrypted VM with a raw disk named directly: vm decrypt
// refuses rather than write the victim's plaintext into the guest's disk.
func TestPlantedDecryptWritesVictimPlaintext(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	dir := filepath.Join(root, "encraw")
	if err := ops.Create(context.Background(), dir, CreateSpec{Name: "vm", Disks: []DiskSpec{{Size: 1 << 20}}, Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "raw.img"), make([]byte, 2<<20), 0o644)
	vmxp := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(vmxp)
	os.WriteFile(vmxp, append(raw, "\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"raw.img\"\n"...), 0o644)
	plant(t, filepath.Join(dir, "raw.img"), cipher)
	if err := ops.Decrypt(context.Background(), dir); err != nil {
		t.Logf("decrypt: %v", err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "raw.img"))
	if bytes.HasPrefix(got, secret) {
		t.Error("vm decrypt wrote the victim's plaintext into the guest's raw disk")
	}
}

// A descriptor rewritten in place (O_TRUNC write, as qemu-img and shell
// redirections do) is seen by a view's cached layout at once.
func TestPlantedStaleLayoutInPlaceDescriptor(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	dir := filepath.Join(root, "enc")
	if err := ops.Create(context.Background(), dir, CreateSpec{Name: "vm", Disks: []DiskSpec{{Size: 1 << 20}}, Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	if err := makeFlatDisk(dir, "p.vmdk", 2<<20); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "q-flat.vmdk"), make([]byte, 2<<20), 0o644)
	if _, err := ops.AttachDisk(context.Background(), dir, "p.vmdk", true); err != nil {
		t.Fatal(err)
	}
	ds := NewDatastore(root, ops.Keys, "")
	defer ds.Close()
	if st, _, _ := ds.Classify("enc/vm-flat.vmdk"); st != FileEncrypted { // caches the layout
		t.Fatal(st)
	}
	// In-place rewrite: p.vmdk now names q-flat.vmdk (plain disk still).
	desc, _ := os.ReadFile(filepath.Join(dir, "p.vmdk"))
	desc = bytes.Replace(desc, []byte(`"p-flat.vmdk"`), []byte(`"q-flat.vmdk"`), 1)
	f, _ := os.OpenFile(filepath.Join(dir, "p.vmdk"), os.O_WRONLY|os.O_TRUNC, 0)
	f.Write(desc)
	f.Close()
	plant(t, filepath.Join(dir, "q-flat.vmdk"), cipher) // guest writes its (new) plain disk
	if leaks(t, ds, "enc/q-flat.vmdk", secret) {
		t.Error("stale layout: the plain disk's new extent served as the victim's plaintext")
	}
	// The cached view and a fresh one agree: refused (it looks like a
	// disk that lost its key lines).
	fresh := NewDatastore(root, ops.Keys, "")
	defer fresh.Close()
	for _, v := range []*Datastore{ds, fresh} {
		if st, _, _ := v.Classify("enc/q-flat.vmdk"); st != FileLocked {
			t.Errorf("view: %v, want locked", st)
		}
	}
}

// Plain VM, guest-writable floppy image holding another VM's encrypted
// core dump (host key): only files named as core dumps open as one.
func TestPlantedCoreDumpInPlainFloppy(t *testing.T) {
	ops, kek := newTestOps(t)
	ops.HostKEK = &kek
	root := t.TempDir()
	src := filepath.Join(t.TempDir(), "vmware-vmx-1.core")
	secret := bytes.Repeat([]byte("victim memory "), 1000)
	os.WriteFile(src, secret, 0o600)
	if err := ops.encryptCoreDump(context.Background(), src); err != nil {
		t.Fatal(err)
	}
	cipher, _ := os.ReadFile(src)
	dir := filepath.Join(root, "plain")
	if err := ops.Create(context.Background(), dir, CreateSpec{Name: "vm", Disks: []DiskSpec{{Size: 1 << 20}}}); err != nil {
		t.Fatal(err)
	}
	vmxp := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(vmxp)
	os.WriteFile(vmxp, append(raw, "floppy0.present = \"TRUE\"\nfloppy0.fileName = \"data.flp\"\n"...), 0o644)
	os.WriteFile(filepath.Join(dir, "data.flp"), make([]byte, 1474560), 0o644)
	plant(t, filepath.Join(dir, "data.flp"), cipher)
	ds := NewDatastore(root, ops.Keys, "")
	defer ds.Close()
	if leaks(t, ds, "plain/data.flp", secret) {
		t.Error("plain VM floppy served as another VM's decrypted core dump")
	}
}

// Another disk's container put in place of an extent is refused: the key
// and disk id come from the descriptor, not from the header copy.
func TestPlantedCopyOverridesDescriptor(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	dir := filepath.Join(root, "enc")
	if err := ops.Create(context.Background(), dir, CreateSpec{Name: "vm", Disks: []DiskSpec{{Size: 1 << 20}}, Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "vm-flat.vmdk"), cipher, 0o600) // another disk's container under this disk's name
	ds := NewDatastore(root, ops.Keys, "")
	defer ds.Close()
	if leaks(t, ds, "enc/vm-flat.vmdk", secret) {
		t.Error("extent of disk D served with the key of another VM's disk (binding not checked against the descriptor)")
	}
}

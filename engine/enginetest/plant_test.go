package enginetest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
)

// victimCipher makes an encrypted VM whose disk holds a secret and
// returns its extent's ciphertext (what a guest could get from a backup).
func victimCipher(t *testing.T, ops *vmops.VMOps, kek keys.KeyRef, root string) ([]byte, []byte) {
	t.Helper()
	ctx := context.Background()
	victim := filepath.Join(root, "victim")
	if err := ops.Create(ctx, victim, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 1 << 20}}}); err != nil {
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

// VMIn creates VM "vm" in root/name with one 1 MiB disk, encrypted under
// kek when kek is not nil.
func vmIn(t *testing.T, ops *vmops.VMOps, kek *keys.KeyRef, root, name string) string {
	t.Helper()
	dir := filepath.Join(root, name)
	spec := vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 1 << 20}}}
	if kek != nil {
		spec.Encrypt, spec.KEK = true, *kek
	}
	if err := ops.Create(context.Background(), dir, spec); err != nil {
		t.Fatal(err)
	}
	return dir
}

// attachFlat makes a plain monolithicFlat disk of 2 MiB in dir and
// attaches it.
func attachFlat(t *testing.T, ops *vmops.VMOps, dir, name string) {
	t.Helper()
	if err := vmops.MakeFlatDisk(dir, name, 2<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := ops.AttachDisk(context.Background(), dir, name, true); err != nil {
		t.Fatal(err)
	}
}

// noPlaintextAfterDecrypt decrypts the VM in dir (an error is fine) and
// requires that file does not start with secret.
func noPlaintextAfterDecrypt(t *testing.T, ops *vmops.VMOps, dir, file string, secret []byte, what string) {
	t.Helper()
	if err := ops.Decrypt(context.Background(), dir); err != nil {
		t.Logf("decrypt: %v", err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, file)); bytes.HasPrefix(got, secret) {
		t.Error(what)
	}
}

// plantFloppy names file in the vmx as a floppy image and writes cipher
// into it, as the guest would.
func plantFloppy(t *testing.T, dir, file string, cipher []byte) {
	t.Helper()
	addVMX(t, dir, "floppy0.present = \"TRUE\"\nfloppy0.fileType = \"file\"\nfloppy0.fileName = \""+file+"\"\n")
	if err := os.WriteFile(filepath.Join(dir, file), make([]byte, 1474560), 0o644); err != nil {
		t.Fatal(err)
	}
	plant(t, filepath.Join(dir, file), cipher)
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

func leaks(t *testing.T, ds *view.Datastore, rel string, secret []byte) bool {
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

// A layout error (here a stale, absent vmx disk entry; also an absolute
// path, a subdirectory, two .vmx, a parentCID mismatch...) once made the
// resolver trust a file's header and its keySafe copy; now it refuses
// (clause unreadable-vm), and a guest's plain disk holding a victim's
// ciphertext is never served as the victim's plaintext.
func TestLayoutErrorRefusesPlantedCiphertext(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	for _, extra := range []string{
		"scsi0:1.present = \"FALSE\"\nscsi0:1.fileName = \"removed.vmdk\"\n",
		"scsi0:2.present = \"TRUE\"\nscsi0:2.fileName = \"/vmfs/volumes/ds2/shared/data.vmdk\"\n",
	} {
		name := "plain" + string(rune('a'+len(extra)%26))
		dir := filepath.Join(root, name)
		if err := ops.Create(context.Background(), dir, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 2 << 20}}}); err != nil {
			t.Fatal(err)
		}
		vmxp := filepath.Join(dir, "vm.vmx")
		raw, _ := os.ReadFile(vmxp)
		os.WriteFile(vmxp, append(raw, extra...), 0o644)
		plant(t, filepath.Join(dir, "vm-flat.vmdk"), cipher)
		ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
		if leaks(t, ds, name+"/vm-flat.vmdk", secret) {
			t.Errorf("plain VM with vmx line %q: guest's plain disk served as the victim's plaintext", extra)
		}
		ds.Close()
	}
}

// A directory without a vmx (a disk kept beside, not inside, its VM:
// shared-disk folders, a second datastore): only core dumps open there
// (clause no-vmx), so planted ciphertext stays ciphertext.
func TestOutsideVMDirServesPlantedCiphertextAsIs(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	extent, secret := victimCipher(t, ops, kek, root)
	core, coreSecret := coreCipher(t, ops, kek)
	shared := filepath.Join(root, "shared")
	os.MkdirAll(shared, 0o755)
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	for name, c := range map[string]struct{ cipher, secret []byte }{
		"data-flat.vmdk":      {extent, secret},
		"core-data-flat.vmdk": {core, coreSecret}, // a core dump's, under a name not a core dump's
	} {
		os.WriteFile(filepath.Join(shared, name), make([]byte, 2<<20), 0o644)
		plant(t, filepath.Join(shared, name), c.cipher)
		if leaks(t, ds, "shared/"+name, c.secret) {
			t.Errorf("plain disk %s outside a VM directory served decrypted", name)
		}
	}
}

// A guest-writable file that is not a hard disk (floppy image) in an
// encrypted VM is plain data, whatever it holds.
func TestPlantedFloppyInEncryptedVM(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	dir := vmIn(t, ops, &kek, root, "enc")
	vmxp := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(vmxp)
	os.WriteFile(vmxp, append(raw, "floppy0.present = \"TRUE\"\nfloppy0.fileType = \"file\"\nfloppy0.fileName = \"data.flp\"\n"...), 0o644)
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
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
	if err := ops.Create(context.Background(), dir, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 2 << 20}}}); err != nil {
		t.Fatal(err)
	}
	vmxp := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(vmxp)
	raw = bytes.Replace(raw, []byte(`fileName = "vm.vmdk"`), []byte(`fileName = "vm-flat.vmdk"`), 1)
	os.WriteFile(vmxp, raw, 0o644)
	plant(t, filepath.Join(dir, "vm-flat.vmdk"), cipher)
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	l, err := vm.LoadLayout(dir, nil)
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
	dir := vmIn(t, ops, &kek, root, "encraw")
	os.WriteFile(filepath.Join(dir, "raw.img"), make([]byte, 2<<20), 0o644)
	vmxp := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(vmxp)
	os.WriteFile(vmxp, append(raw, "\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"raw.img\"\n"...), 0o644)
	plant(t, filepath.Join(dir, "raw.img"), cipher)
	noPlaintextAfterDecrypt(t, ops, dir, "raw.img", secret, "vm decrypt wrote the victim's plaintext into the guest's raw disk")
}

// A descriptor rewritten in place (O_TRUNC write, as qemu-img and shell
// redirections do) is seen by a view's cached layout at once.
func TestPlantedStaleLayoutInPlaceDescriptor(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	dir := vmIn(t, ops, &kek, root, "enc")
	attachFlat(t, ops, dir, "p.vmdk")
	os.WriteFile(filepath.Join(dir, "q-flat.vmdk"), make([]byte, 2<<20), 0o644)
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	if st, _, _ := ds.Classify("enc/vm-flat.vmdk"); st != view.FileEncrypted { // caches the layout
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
	fresh := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer fresh.Close()
	for _, v := range []*view.Datastore{ds, fresh} {
		if st, _, _ := v.Classify("enc/q-flat.vmdk"); st != view.FileLocked {
			t.Errorf("view: %v, want locked", st)
		}
	}
}

// Plain VM, guest-writable floppy image holding another VM's encrypted
// Another disk's container put in place of an extent is refused: the key
// and disk id come from the descriptor, not from the header copy.
func TestPlantedCopyOverridesDescriptor(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	dir := vmIn(t, ops, &kek, root, "enc")
	os.WriteFile(filepath.Join(dir, "vm-flat.vmdk"), cipher, 0o600) // another disk's container under this disk's name
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	if leaks(t, ds, "enc/vm-flat.vmdk", secret) {
		t.Error("extent of disk D served with the key of another VM's disk (binding not checked against the descriptor)")
	}
}

// coreCipher returns an encrypted core dump (host key) of another VM.
func coreCipher(t *testing.T, ops *vmops.VMOps, kek keys.KeyRef) ([]byte, []byte) {
	t.Helper()
	ops.HostKEK = &kek
	src := filepath.Join(t.TempDir(), "vmware-vmx-1.core")
	secret := bytes.Repeat([]byte("victim memory "), 1000)
	os.WriteFile(src, secret, 0o600)
	if err := ops.EncryptCoreDump(context.Background(), src, container.RandomTemp); err != nil {
		t.Fatal(err)
	}
	cipher, _ := os.ReadFile(src)
	return cipher, secret
}

func addVMX(t *testing.T, dir, lines string) {
	t.Helper()
	p := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(p)
	if err := os.WriteFile(p, append(raw, lines...), 0o644); err != nil {
		t.Fatal(err)
	}
}

// a guest-writable floppy whose name starts with "core" (coreos.flp)
// is not a core dump by name: never served decrypted under its header copy.
func TestPlantedCoreNamedFloppy(t *testing.T) {
	ops, kek := newTestOps(t)
	cipher, secret := coreCipher(t, ops, kek)
	root := t.TempDir()
	dir := vmIn(t, ops, nil, root, "plain")
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	for _, name := range []string{"data.flp", "coreos-ignition.flp", "core.2"} {
		plantFloppy(t, dir, name, cipher)
		if leaks(t, ds, "plain/"+name, secret) {
			t.Errorf("guest floppy %s served as another VM's decrypted core dump", name)
		}
	}
}

// vm decrypt decrypts, on disk, a planted core dump in a
// guest-writable core*-named file (the guest then reads the plaintext).
func TestPlantedDecryptCoreNamedFloppy(t *testing.T) {
	ops, kek := newTestOps(t)
	cipher, secret := coreCipher(t, ops, kek)
	root := t.TempDir()
	dir := vmIn(t, ops, &kek, root, "enc")
	plantFloppy(t, dir, "coreos.flp", cipher)
	noPlaintextAfterDecrypt(t, ops, dir, "coreos.flp", secret, "vm decrypt wrote another VM's core dump plaintext into the guest's floppy")
}

// a plain disk of an encrypted VM, removed from the vmx (files kept):
// its flat extent is refused, not opened with its header copy.
func TestPlantedDetachedPlainDisk(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	dir := vmIn(t, ops, &kek, root, "enc")
	attachFlat(t, ops, dir, "p.vmdk")
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	plant(t, filepath.Join(dir, "p-flat.vmdk"), cipher) // guest writes its plain disk
	if leaks(t, ds, "enc/p-flat.vmdk", secret) {
		t.Fatal("attached: leaked")
	}
	// "Remove from VM" keeping the files.
	vmxp := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(vmxp)
	raw = bytes.Replace(raw, []byte(`fileName = "p.vmdk"`), []byte(`fileName = ""`), 1)
	os.WriteFile(vmxp, raw, 0o644)
	if leaks(t, ds, "enc/p-flat.vmdk", secret) {
		t.Error("detached plain disk of an encrypted VM served as the victim's plaintext")
	}
}

// a second .vmx in an encrypted VM's directory makes it unreadable, not
// "not a VM directory": no container is served raw, no VM file is created
// plain.
func TestPlantedTwoVMX(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	dir := vmIn(t, ops, &kek, root, "enc")
	raw, _ := os.ReadFile(filepath.Join(dir, "vm.vmx"))
	os.WriteFile(filepath.Join(dir, "vm-copy.vmx"), raw, 0o644)
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	for _, f := range []string{"enc/vm-flat.vmdk", "enc/vm.nvram"} {
		if st, why, _ := ds.Classify(f); st == view.FilePlain {
			t.Errorf("%s: Classify = plain (%q); the view would serve/write its ciphertext raw", f, why)
		}
	}
	if enc, err := ds.WouldEncrypt("enc/vm.vswp"); !enc && err == nil {
		t.Error("new swap file of an encrypted VM would be created plain")
	}
	if c, enc, err := ds.Create("enc/vm.vswp", 0o600); err == nil {
		c.Close()
		if !enc {
			t.Error("new swap file of an encrypted VM created plain")
		}
	}
}

// A disk made through the view of an encrypted VM named coreos.vmdk is
// a disk, not a core dump.
func TestPlantedViewDiskNamedCore(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	vmIn(t, ops, &kek, root, "enc")
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	for _, name := range []string{"coreos.vmdk", "data.vmdk"} {
		c, enc, err := ds.Create("enc/"+name, 0o644)
		if err != nil || !enc {
			t.Fatalf("%s: create: %v %v", name, enc, err)
		}
		c.Close()
		st, why, _ := ds.Classify("enc/" + name)
		c2, err := ds.Open("enc/"+name, false)
		if err != nil {
			t.Errorf("%s: made through the view, then Classify=%v %q, Open: %v", name, st, why, err)
			continue
		}
		c2.Close()
	}
}

// vm encrypt of a VM whose directory holds an install ISO named core*
// leaves it alone (not a core dump).
func TestPlantedEncryptCoreNamedISO(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	dir := vmIn(t, ops, nil, root, "plain")
	addVMX(t, dir, "sata0:0.present = \"TRUE\"\nsata0:0.deviceType = \"cdrom-image\"\nsata0:0.fileName = \"coreos-installer.iso\"\n")
	os.WriteFile(filepath.Join(dir, "coreos-installer.iso"), bytes.Repeat([]byte("ISO"), 1000), 0o644)
	err := ops.Encrypt(context.Background(), dir, kek)
	t.Logf("encrypt without host key: %v", err)
	if err != nil {
		t.Error("vm encrypt refused because of an ISO named coreos-*.iso")
	}
}

// An in-place descriptor edit racing a layout load is never cached as
// fresh.
func TestPlantedStaleStampRace(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	dir := vmIn(t, ops, &kek, root, "enc")
	attachFlat(t, ops, dir, "p.vmdk")
	os.WriteFile(filepath.Join(dir, "q-flat.vmdk"), make([]byte, 2<<20), 0o644)
	cipher, secret := victimCipher(t, ops, kek, root)
	plant(t, filepath.Join(dir, "q-flat.vmdk"), cipher) // the guest's disk once p.vmdk names it
	pp := filepath.Join(dir, "p.vmdk")
	A, _ := os.ReadFile(pp)
	B := bytes.Replace(A, []byte(`"p-flat.vmdk"`), []byte(`"q-flat.vmdk"`), 1)
	write := func(b []byte) {
		f, _ := os.OpenFile(pp, os.O_WRONLY|os.O_TRUNC, 0)
		f.Write(b)
		f.Close()
	}
	for trial := 0; trial < 300; trial++ {
		ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
		write(A)
		done := make(chan struct{})
		go func() { write(B); close(done) }()
		ds.Layout(dir)
		<-done
		l, err := ds.Layout(dir) // B is final: must name q-flat
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range l.Disks {
			if d.Name == "p.vmdk" && (len(d.Extents) != 1 || d.Extents[0] != "q-flat.vmdk") {
				t.Errorf("trial %d: cached layout names %v after the descriptor was rewritten to q-flat.vmdk", trial, d.Extents)
				if leaks(t, ds, "enc/q-flat.vmdk", secret) {
					t.Error("stale layout: the guest's attached plain disk served as the victim's plaintext")
				}
				ds.Close()
				return
			}
		}
		ds.Close()
	}
}

// A hard link named like a core dump to a guest's flat extent: a file
// with several names is never opened with its own key copy.
func TestPlantedHardLinkCoreName(t *testing.T) {
	ops, kek := newTestOps(t)
	cipher, secret := coreCipher(t, ops, kek)
	root := t.TempDir()
	dir := filepath.Join(root, "plain")
	if err := ops.Create(context.Background(), dir, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 2 << 20}}}); err != nil {
		t.Fatal(err)
	}
	plant(t, filepath.Join(dir, "vm-flat.vmdk"), cipher)
	if err := os.Link(filepath.Join(dir, "vm-flat.vmdk"), filepath.Join(dir, "core.1")); err != nil {
		t.Fatal(err)
	}
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	for rel, want := range map[string]view.FileState{"plain/core.1": view.FileLocked, "plain/vm-flat.vmdk": view.FilePlain} {
		if leaks(t, ds, rel, secret) {
			t.Errorf("%s: a hard-linked guest extent served as another VM's core dump", rel)
		}
		if st, _, _ := ds.Classify(rel); st != want {
			t.Errorf("%s: classified %v, want %v", rel, st, want)
		}
	}
}

// A detached plain disk's extent, planted with another VM's container,
// and a "descriptor" the guest wrote into its own small flat disk naming
// it with the victim's key lines: guest-writable files never describe
// anything.
func TestPlantedGuestWrittenDescriptor(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	cipher, secret := victimCipher(t, ops, kek, root)
	victimDesc, _ := os.ReadFile(filepath.Join(root, "victim", "vm.vmdk"))
	dir := vmIn(t, ops, &kek, root, "enc")
	for _, n := range []string{"a.vmdk", "p.vmdk"} {
		if err := vmops.MakeFlatDisk(dir, n, 2<<20); err != nil {
			t.Fatal(err)
		}
		if _, err := ops.AttachDisk(context.Background(), dir, n, true); err != nil {
			t.Fatal(err)
		}
	}
	fake := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n" +
		"RW 4096 FLAT \"p-flat.vmdk\" 0\n" + lineOf(string(victimDesc), vm.DescKeySafe) + lineOf(string(victimDesc), vm.DDBDiskID)
	buf := bytes.Repeat([]byte("\n"), 512<<10)
	copy(buf, fake)
	// A small disk (a seed image): under the 1 MiB a descriptor may have.
	if err := os.Truncate(filepath.Join(dir, "a-flat.vmdk"), int64(len(buf))); err != nil {
		t.Fatal(err)
	}
	plant(t, filepath.Join(dir, "a-flat.vmdk"), buf)
	plant(t, filepath.Join(dir, "p-flat.vmdk"), cipher)
	vmxp := filepath.Join(dir, "vm.vmx")
	raw, _ := os.ReadFile(vmxp)
	os.WriteFile(vmxp, bytes.Replace(raw, []byte(`fileName = "p.vmdk"`), []byte(`fileName = ""`), 1), 0o644)
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	if leaks(t, ds, "enc/p-flat.vmdk", secret) {
		t.Error("a descriptor written by the guest into its own disk unlocked another VM's data")
	}
}

func lineOf(text, key string) string {
	for _, l := range strings.SplitAfter(text, "\n") {
		if strings.HasPrefix(l, key) {
			return l
		}
	}
	return ""
}

// A disk made through the view keeps working after a rename in the view
// (qemu-img convert to a temporary name, then mv).
func TestViewMadeDiskRenamed(t *testing.T) {
	ops, kek := newTestOps(t)
	root := t.TempDir()
	dir := vmIn(t, ops, &kek, root, "enc")
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	c, enc, err := ds.Create("enc/tmp.vmdk", 0o644)
	if err != nil || !enc {
		t.Fatal(enc, err)
	}
	c.WriteAt(append([]byte("KDMV"), make([]byte, 4092)...), 0)
	c.Close()
	if err := os.Rename(filepath.Join(dir, "tmp.vmdk"), filepath.Join(dir, "final.vmdk")); err != nil {
		t.Fatal(err)
	}
	c, err = ds.Open("enc/final.vmdk", true)
	if err != nil {
		t.Fatalf("made disk after rename: %v", err)
	}
	c.Close()
}

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
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
)

func TestDescriptorName(t *testing.T) {
	for _, tc := range []struct {
		in, desc string
		extent   bool
	}{
		{"disk.vmdk", "disk.vmdk", false},
		{"disk-flat.vmdk", "disk.vmdk", true},
		{"disk-s001.vmdk", "disk.vmdk", true},
		{"disk-f012.vmdk", "disk.vmdk", true},
		{"my-disk-000001-delta.vmdk", "my-disk-000001.vmdk", true},
		{"a-sesparse.VMDK", "a.VMDK", true},
		{"disk-ctk.vmdk", "disk-ctk.vmdk", false},
		{"disk-s1.vmdk", "disk-s1.vmdk", false},
		{"-flat.vmdk", "-flat.vmdk", false},
	} {
		desc, ext := vm.DescriptorName(tc.in)
		if desc != tc.desc || ext != tc.extent {
			t.Errorf("descriptorName(%q) = %q, %v; want %q, %v", tc.in, desc, ext, tc.desc, tc.extent)
		}
	}
}

// createThrough makes a file as a view would: through Datastore.Create,
// writing data and closing.
func createThrough(t *testing.T, ds *view.Datastore, rel string, data []byte) {
	t.Helper()
	c, enc, err := ds.Create(rel, 0o640)
	if err != nil || !enc {
		t.Fatalf("create %s: encrypted=%v err=%v", rel, enc, err)
	}
	if len(data) > 0 {
		if _, err := c.WriteAt(data, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

func neverOpen(string) bool { return false }

// encryptedVM creates an encrypted VM "vm" (with disks) in a datastore
// and returns a resolver for the datastore.
func encryptedVM(t *testing.T, disks []vmops.DiskSpec) (*vmops.VMOps, string, *view.Datastore) {
	t.Helper()
	ops, kek := newTestOps(t)
	root := t.TempDir()
	dir := filepath.Join(root, "vm")
	if err := ops.Create(context.Background(), dir, vmops.CreateSpec{Name: "vm", Disks: disks, Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	t.Cleanup(ds.Close)
	return ops, dir, ds
}

func descValue(t *testing.T, text []byte, key string) string {
	t.Helper()
	d, err := vmdk.ParseDescriptor(text)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := d.Get(key)
	return v
}

// A disk made through a view inside an encrypted VM, descriptor first
// (qemu-img's order): the extents are containers of one new disk, and the
// descriptor becomes plain text with the key lines once it is settled.
func TestViewDiskSettle(t *testing.T) {
	ops, dir, ds := encryptedVM(t, []vmops.DiskSpec{{Size: 1 << 20}})
	ctx := context.Background()
	root := filepath.Dir(dir)

	if enc, err := ds.WouldEncrypt("vm/new.vmdk"); err != nil || !enc {
		t.Fatalf("WouldEncrypt(new.vmdk) = %v, %v", enc, err)
	}
	// Opened and closed empty first, as qemu's file create does.
	createThrough(t, ds, "vm/new.vmdk", nil)
	if got, err := ds.Settle("vm/new.vmdk", neverOpen, nil); err != nil || got != nil {
		t.Fatalf("settle of empty descriptor: %v %v", got, err)
	}
	data := bytes.Repeat([]byte("guest data! "), 100000)
	createThrough(t, ds, "vm/new-s001.vmdk", data)
	createThrough(t, ds, "vm/new-s002.vmdk", data[:4096])
	desc := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\n" +
		"# Extent description\nRW 4194304 SPARSE \"new-s001.vmdk\"\nRW 4194304 SPARSE \"new-s002.vmdk\"\n\n" +
		"# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n"
	c, err := ds.Open("vm/new.vmdk", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt([]byte(desc), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	// While open elsewhere, an extent's close does not settle it.
	if got, err := ds.Settle("vm/new-s002.vmdk", func(r string) bool { return r == "vm/new.vmdk" }, nil); err != nil || got != nil {
		t.Fatalf("settle while descriptor open: %v %v", got, err)
	}
	c.Close()
	got, err := ds.Settle("vm/new.vmdk", neverOpen, nil)
	if err != nil || len(got) != 1 || got[0] != "vm/new.vmdk" {
		t.Fatalf("settle: %v %v", got, err)
	}
	text, err := os.ReadFile(filepath.Join(dir, "new.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	ks, id := descValue(t, text, vm.DescKeySafe), descValue(t, text, vm.DDBDiskID)
	if !strings.HasPrefix(string(text), "# Disk DescriptorFile") || ks == "" || id == "" {
		t.Fatalf("settled descriptor lacks its key lines:\n%s", text)
	}
	// Created 0640 through the view of an encrypted VM: at most 0600
	// (EncryptedFilePerm), and the settle keeps that.
	if st, _ := os.Stat(filepath.Join(dir, "new.vmdk")); st.Mode().Perm() != 0o600 {
		t.Errorf("descriptor mode %v, want 0600", st.Mode().Perm())
	}
	for _, e := range []string{"new-s001.vmdk", "new-s002.vmdk"} {
		raw, _ := os.ReadFile(filepath.Join(dir, e))
		h, err := container.PeekHeader(raw)
		if err != nil || h.Binding != (keys.Binding{Purpose: keys.PurposeDisk, OwnerID: id}) {
			t.Fatalf("%s: header %+v %v, want disk %s", e, h, err, id)
		}
		if bytes.Contains(raw, []byte("guest data!")) {
			t.Fatalf("%s holds plaintext", e)
		}
		if eks, ok := container.ReadEmbeddedKeySafe(raw); !ok || eks != ks {
			t.Fatalf("%s: embedded keySafe %q, want the descriptor's", e, eks)
		}
	}
	// A second settle has nothing to do.
	if got, err := ds.Settle("vm/new.vmdk", neverOpen, nil); err != nil || got != nil {
		t.Fatalf("second settle: %v %v", got, err)
	}
	// Read back through a fresh resolver (as after a daemon restart).
	ds2 := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
	defer ds2.Close()
	if st, reason, err := ds2.Classify("vm/new-s001.vmdk"); err != nil || st != view.FileEncrypted {
		t.Fatalf("classify extent: %v %q %v", st, reason, err)
	}
	if st, _, _ := ds2.Classify("vm/new.vmdk"); st != view.FilePlain {
		t.Fatalf("settled descriptor classified %v, want plain", st)
	}
	c, err = ds2.Open("vm/new-s001.vmdk", true)
	if err != nil {
		t.Fatal(err)
	}
	back := make([]byte, len(data))
	if _, err := c.ReadAt(back, 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if !bytes.Equal(back, data) {
		t.Fatal("extent data differs")
	}

	// Replacing the plain descriptor (sed -i renames a plain temp over it)
	// keeps it plain; an editor that writes a new file gets a container
	// that settles back to plain text with its own key lines.
	if enc, err := ds2.WouldEncrypt("vm/new.vmdk"); err != nil || enc {
		t.Fatalf("WouldEncrypt(existing plain descriptor) = %v, %v", enc, err)
	}
	if err := os.Rename(filepath.Join(dir, "new.vmdk"), filepath.Join(dir, "new.vmdk~")); err != nil {
		t.Fatal(err)
	}
	edited := append(bytes.Clone(text), "# edited\n"...)
	createThrough(t, ds2, "vm/new.vmdk", edited)
	if !ds2.Unsettled("vm/new.vmdk") {
		t.Fatal("new descriptor not pending")
	}
	if got, err := ds2.Settle("vm/new.vmdk", neverOpen, nil); err != nil || len(got) != 1 {
		t.Fatalf("settle of edited descriptor: %v %v", got, err)
	}
	if back, _ := os.ReadFile(filepath.Join(dir, "new.vmdk")); !bytes.Equal(back, edited) {
		t.Fatalf("edited descriptor changed by settle:\n%s", back)
	}
	// A copy that names keys which do not open the extents is refused.
	forged := bytes.Replace(text, []byte(id), []byte("00000000-0000-4000-8000-000000000000"), 1)
	createThrough(t, ds2, "vm/forged.vmdk", bytes.Replace(forged, []byte(`"new-s00`), []byte(`"new-s00`), -1))
	if got, err := ds2.Settle("vm/forged.vmdk", neverOpen, nil); err == nil || got != nil {
		t.Fatalf("settle of forged descriptor: %v %v", got, err)
	}

	// Attached to the VM, a shallow rekey rewraps the extents' copies too,
	// so they open with only the new KEK; a decrypt then leaves plain files.
	vmxPath := filepath.Join(dir, "vm.vmx")
	vmxText, _ := os.ReadFile(vmxPath)
	vmxText = append(vmxText, []byte("\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"new.vmdk\"\n")...)
	if err := os.WriteFile(vmxPath, vmxText, 0o644); err != nil {
		t.Fatal(err)
	}
	kek2, err := ops.Keys.Create(ctx, "mem", "kek2")
	if err != nil {
		t.Fatal(err)
	}
	if err := ops.RekeyShallow(ctx, dir, kek2.Ref); err != nil {
		t.Fatal(err)
	}
	text, _ = os.ReadFile(filepath.Join(dir, "new.vmdk"))
	nks := descValue(t, text, vm.DescKeySafe)
	for _, e := range []string{"new-s001.vmdk", "new-s002.vmdk"} {
		eks, ok, err := container.ReadEmbeddedKeySafeFile(filepath.Join(dir, e))
		if err != nil || !ok || eks != nks || eks == ks {
			t.Fatalf("%s: embedded keySafe not rewrapped (ok=%v err=%v)", e, ok, err)
		}
	}
	// The forged descriptor is a container nothing names: a decrypt
	// would leave it behind, so it changes nothing until it is moved away.
	if err := ops.Decrypt(ctx, dir); err == nil || !strings.Contains(err.Error(), "forged.vmdk") {
		t.Fatalf("decrypt with an unattached container: %v", err)
	}
	if raw, _ := os.ReadFile(filepath.Join(dir, "new-s001.vmdk")); bytes.Contains(raw, data[:4096]) {
		t.Fatal("refused decrypt changed an extent")
	}
	os.Remove(filepath.Join(dir, "forged.vmdk"))
	if err := ops.Decrypt(ctx, dir); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "new-s001.vmdk"))
	if !bytes.Equal(raw, data) {
		t.Fatal("decrypted extent differs")
	}
}

// A .vmdk that holds its own descriptor (sparse) stays a container, and
// a file that is not a disk at all is never decrypted to disk.
func TestViewDiskStaysEncrypted(t *testing.T) {
	_, dir, ds := encryptedVM(t, nil)
	for name, content := range map[string][]byte{
		"sparse.vmdk": append([]byte("KDMV\x01\x00\x00\x00"), bytes.Repeat([]byte{7}, 9000)...),
		"junk.vmdk":   []byte("# not a descriptor\nRW 1 FLAT \"x\" 0\n"),
		// A descriptor whose extent is a plain file must not be adopted.
		"half.vmdk": []byte("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"plain.raw\" 0\n"),
	} {
		createThrough(t, ds, "vm/"+name, content)
	}
	os.WriteFile(filepath.Join(dir, "plain.raw"), make([]byte, 1<<20), 0o644)
	for _, name := range []string{"sparse.vmdk", "junk.vmdk", "half.vmdk"} {
		got, err := ds.Settle("vm/"+name, neverOpen, nil)
		if got != nil || (name != "half.vmdk" && err != nil) || (name == "half.vmdk" && err == nil) {
			t.Fatalf("settle %s: %v %v", name, got, err)
		}
		raw, _ := os.ReadFile(filepath.Join(dir, name))
		if _, err := container.PeekHeader(raw); err != nil {
			t.Fatalf("%s is no longer a container", name)
		}
		if st, reason, err := ds.Classify("vm/" + name); err != nil || st != view.FileEncrypted {
			t.Fatalf("classify %s: %v %q %v", name, st, reason, err)
		}
	}
	// Outside a VM directory, or a plain file kind, nothing is encrypted.
	if enc, _ := ds.WouldEncrypt("elsewhere.vmdk"); enc {
		t.Fatal("a .vmdk outside a VM would be encrypted")
	}
	if enc, _ := ds.WouldEncrypt("vm/notes.txt"); enc {
		t.Fatal("a text file in an encrypted VM would be encrypted")
	}
}

// A container renamed over a file of another kind of the same VM (same
// key) is refused rather than served under the wrong name.
func TestDatastoreKindMismatch(t *testing.T) {
	_, dir, ds := encryptedVM(t, nil)
	createThrough(t, ds, "vm/vm.vswp", bytes.Repeat([]byte{1}, 8192))
	c, err := ds.Open("vm/vm.nvram", true)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := os.Rename(filepath.Join(dir, "vm.vswp"), filepath.Join(dir, "vm.nvram")); err != nil {
		t.Fatal(err)
	}
	if _, err := ds.Open("vm/vm.nvram", true); !errors.Is(err, container.ErrKindMismatch) || !errors.Is(err, vm.ErrRefused) {
		t.Fatalf("open of a swap file named nvram: %v, want ErrKindMismatch", err)
	}
	// Classify agrees (it used to say FileEncrypted, so the view listed
	// the file as encrypted and open(2) got EIO).
	if st, why, err := ds.Classify("vm/vm.nvram"); err != nil || st != view.FileLocked || !strings.Contains(why, "vswp") {
		t.Fatalf("Classify of a swap file named nvram: %v %q %v, want locked (kind)", st, why, err)
	}
}

// Without the VM's KEK in memory, new files in it cannot be made: the
// error says the key is unavailable (the view answers EACCES).
func TestViewCreateLockedVM(t *testing.T) {
	ops, kek := newTestOps(t)
	ctx := context.Background()
	root := t.TempDir()
	dir := filepath.Join(root, "vm")
	if err := ops.Create(ctx, dir, vmops.CreateSpec{Name: "vm", Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	empty := keys.NewKeyring()
	defer empty.Close()
	ds := view.NewDatastore(root, empty, view.DatastoreOptions{})
	defer ds.Close()
	for _, name := range []string{"new.vmdk", "vm2.vswp"} {
		if _, _, err := ds.Create("vm/"+name, 0o600); !errors.Is(err, keys.ErrKeyUnavailable) {
			t.Errorf("create %s in a locked VM: %v, want ErrKeyUnavailable", name, err)
		}
		if _, err := os.Stat(filepath.Join(dir, name)); !os.IsNotExist(err) {
			t.Errorf("%s was created anyway", name)
		}
	}
}

// Copying a disk in (descriptor first, then its extent, as cp does): the
// descriptor waits for its extent, whose close settles it.
func TestViewDiskSettleByExtent(t *testing.T) {
	_, dir, ds := encryptedVM(t, nil)
	desc := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n" +
		"# Extent description\nRW 2048 FLAT \"cp-flat.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n"
	createThrough(t, ds, "vm/cp.vmdk", []byte(desc))
	if got, err := ds.Settle("vm/cp.vmdk", neverOpen, nil); err != nil || got != nil {
		t.Fatalf("settle without its extent: %v %v", got, err)
	}
	if !ds.Unsettled("vm/cp-flat.vmdk") {
		t.Fatal("extent of a pending disk not reported unsettled")
	}
	createThrough(t, ds, "vm/cp-flat.vmdk", bytes.Repeat([]byte{9}, 1<<20))
	got, err := ds.Settle("vm/cp-flat.vmdk", neverOpen, nil)
	if err != nil || len(got) != 1 || got[0] != "vm/cp.vmdk" {
		t.Fatalf("settle by the extent: %v %v", got, err)
	}
	text, _ := os.ReadFile(filepath.Join(dir, "cp.vmdk"))
	if descValue(t, text, vm.DescKeySafe) == "" || descValue(t, text, "ddb.adapterType") != "lsilogic" {
		t.Fatalf("settled descriptor:\n%s", text)
	}
	if ds.Unsettled("vm/cp-flat.vmdk") {
		t.Fatal("still unsettled after settling")
	}
}

// Review cases: a vmx naming a disk not yet created still encrypts new
// files; an extent recreated after its descriptor settled joins that
// disk; a descriptor naming itself is not settled; a shallow rekey never
// overwrites the key copy of an extent that holds another disk's key.
func TestViewDiskReviewCases(t *testing.T) {
	ops, dir, ds := encryptedVM(t, nil)
	ctx := context.Background()
	vmxPath := filepath.Join(dir, "vm.vmx")
	vmxText, _ := os.ReadFile(vmxPath)
	withDisk := append(bytes.Clone(vmxText), "\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"r.vmdk\"\n"...)
	if err := os.WriteFile(vmxPath, withDisk, 0o644); err != nil {
		t.Fatal(err)
	}
	// The vmx names r.vmdk, which does not exist yet: still encrypted.
	if enc, err := ds.WouldEncrypt("vm/r.vmdk"); err != nil || !enc {
		t.Fatalf("WouldEncrypt with a missing named disk: %v %v", enc, err)
	}
	desc := "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"r-flat.vmdk\" 0\n"
	createThrough(t, ds, "vm/r.vmdk", nil)
	createThrough(t, ds, "vm/r-flat.vmdk", bytes.Repeat([]byte{3}, 1<<20))
	c, err := ds.Open("vm/r.vmdk", false)
	if err != nil {
		t.Fatal(err)
	}
	c.WriteAt([]byte(desc), 0)
	c.Close()
	if got, err := ds.Settle("vm/r.vmdk", neverOpen, nil); err != nil || len(got) != 1 {
		t.Fatalf("settle: %v %v", got, err)
	}
	text, _ := os.ReadFile(filepath.Join(dir, "r.vmdk"))
	id := descValue(t, text, vm.DDBDiskID)
	// Recreated extent (e.g. restored from a backup) joins disk id.
	os.Remove(filepath.Join(dir, "r-flat.vmdk"))
	ds2 := view.NewDatastore(filepath.Dir(dir), ops.Keys, view.DatastoreOptions{})
	defer ds2.Close()
	os.WriteFile(vmxPath, vmxText, 0o644) // not attached: the layout does not know r.vmdk
	createThrough(t, ds2, "vm/r-flat.vmdk", bytes.Repeat([]byte{4}, 1<<20))
	raw, _ := os.ReadFile(filepath.Join(dir, "r-flat.vmdk"))
	if h, err := container.PeekHeader(raw); err != nil || h.Binding.OwnerID != id {
		t.Fatalf("recreated extent bound to %+v, want disk %s", h.Binding, id)
	}

	// A descriptor that names itself as its extent stays encrypted.
	createThrough(t, ds2, "vm/self.vmdk", []byte("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"self.vmdk\" 0\n"))
	if got, err := ds2.Settle("vm/self.vmdk", neverOpen, nil); got != nil || err == nil {
		t.Fatalf("settle of a self-naming descriptor: %v %v", got, err)
	}

	// An extent of r that holds another disk's key (planted): the rekey
	// stops and leaves that extent's own copy alone.
	other := filepath.Join(dir, "r-flat.vmdk")
	ds3 := view.NewDatastore(filepath.Dir(dir), ops.Keys, view.DatastoreOptions{})
	defer ds3.Close()
	createThrough(t, ds3, "vm/x.vmdk", []byte("junk"))
	os.Rename(filepath.Join(dir, "x.vmdk"), other)
	before, _, _ := container.ReadEmbeddedKeySafeFile(other)
	os.WriteFile(vmxPath, withDisk, 0o644)
	kek2, err := ops.Keys.Create(ctx, "mem", "kek2")
	if err != nil {
		t.Fatal(err)
	}
	if err := ops.RekeyShallow(ctx, dir, kek2.Ref); err == nil || !strings.Contains(err.Error(), "another disk's key") {
		t.Fatalf("rekey over a foreign extent: %v", err)
	}
	if after, _, _ := container.ReadEmbeddedKeySafeFile(other); after != before {
		t.Fatal("the foreign extent's key copy was overwritten")
	}
}

// Pending disks live in memory. After a restart (a fresh resolver) a
// disk made through a view and not attached is no longer one this view
// made: its files are refused (nothing but its own header vouches for
// them) until an administrator attaches it. Then its descriptor, still a
// container holding text, is found again at a writable open and settles
// at that file's close.
func TestViewDiskSettleAfterRestart(t *testing.T) {
	ops, dir, ds := encryptedVM(t, nil)
	desc := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n" +
		"# Extent description\nRW 2048 FLAT \"rs-flat.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\n"
	createThrough(t, ds, "vm/rs.vmdk", []byte(desc))
	createThrough(t, ds, "vm/rs-flat.vmdk", bytes.Repeat([]byte{7}, 1<<20))
	// No Settle: the daemon "restarts" here.
	ds2 := view.NewDatastore(filepath.Dir(dir), ops.Keys, view.DatastoreOptions{})
	defer ds2.Close()
	for _, rel := range []string{"vm/rs.vmdk", "vm/rs-flat.vmdk"} {
		if _, err := ds2.Open(rel, true); !errors.Is(err, vm.ErrRefused) {
			t.Fatalf("%s after a restart, not attached: %v, want refused", rel, err)
		}
	}
	if enc, err := ops.AttachDisk(context.Background(), dir, "rs.vmdk", true); err != nil || !enc {
		t.Fatalf("attach: %v %v", enc, err)
	}
	// A read-only open changes nothing.
	c, err := ds2.Open("vm/rs.vmdk", true)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if ds2.Unsettled("vm/rs.vmdk") {
		t.Fatal("read-only open made the disk pending")
	}
	c, err = ds2.Open("vm/rs.vmdk", false)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if !ds2.Unsettled("vm/rs-flat.vmdk") {
		t.Fatal("unsettled descriptor not found again")
	}
	got, err := ds2.Settle("vm/rs.vmdk", neverOpen, nil)
	if err != nil || len(got) != 1 || got[0] != "vm/rs.vmdk" {
		t.Fatalf("settle after restart: %v %v", got, err)
	}
	if c, err := ds2.Open("vm/rs-flat.vmdk", true); err != nil {
		t.Fatalf("extent after settle: %v", err)
	} else {
		c.Close()
	}
	text, _ := os.ReadFile(filepath.Join(dir, "rs.vmdk"))
	if descValue(t, text, vm.DescKeySafe) == "" || descValue(t, text, vm.DDBDiskID) == "" {
		t.Fatalf("settled descriptor:\n%s", text)
	}
	// A descriptor a settle left encrypted (here: one naming itself as
	// its extent) is not made pending again by the next open.
	self := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n" +
		"# Extent description\nRW 2048 FLAT \"self.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\n"
	createThrough(t, ds2, "vm/self.vmdk", []byte(self))
	if got, _ := ds2.Settle("vm/self.vmdk", neverOpen, nil); got != nil {
		t.Fatalf("self-naming descriptor settled: %v", got)
	}
	c, err = ds2.Open("vm/self.vmdk", false)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if ds2.Unsettled("vm/self.vmdk") {
		t.Fatal("a descriptor left encrypted became pending again")
	}
	// A sparse disk made through the view (a container whose plaintext
	// is not a text descriptor) never becomes pending on open.
	createThrough(t, ds2, "vm/sp.vmdk", append([]byte("KDMV"), make([]byte, 4092)...))
	ds2.Settle("vm/sp.vmdk", neverOpen, nil)
	ds3 := view.NewDatastore(filepath.Dir(dir), ops.Keys, view.DatastoreOptions{})
	defer ds3.Close()
	if _, err := ops.AttachDisk(context.Background(), dir, "sp.vmdk", true); err != nil {
		t.Fatal(err)
	}
	c, err = ds3.Open("vm/sp.vmdk", false)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if ds3.Unsettled("vm/sp.vmdk") {
		t.Fatal("a sparse container became pending")
	}
}

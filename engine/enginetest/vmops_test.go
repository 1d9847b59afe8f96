package enginetest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/internal/testkit"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
)

func needTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s not installed (make deps installs it)", name)
		}
		t.Skipf("%s not installed", name)
	}
}

func run(t *testing.T, dir string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// makeVM builds a VM directory with one disk per qemu subformat (data
// written by qemu-io), an nvram, a swap file, a snapshot state file and a
// vmx with sensitive lines.
func makeVM(t *testing.T) string {
	t.Helper()
	needTool(t, "qemu-img")
	needTool(t, "qemu-io")
	dir := t.TempDir()
	subformats := []string{"monolithicFlat", "monolithicSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"}
	var vmx strings.Builder
	vmx.WriteString(".encoding = \"UTF-8\"\nconfig.version = \"8\"\ndisplayName = \"test vm\"\n")
	vmx.WriteString("guestinfo.password = \"s3cret\"\nnvram = \"vm.nvram\"\nsched.swap.derivedName = \"vm.vswp\"\n")
	for i, sf := range subformats {
		name := fmt.Sprintf("disk%d.vmdk", i)
		src := name
		if sf == "streamOptimized" {
			src = "src.vmdk"
			run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", src, "3M")
		} else {
			run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sf, name, "3M")
		}
		run(t, dir, "qemu-io", "-f", "vmdk", "-c", fmt.Sprintf("write -P 0x%x 0 64k", 0xa0+i), "-c", "write -P 0x5c 1M 300k", src)
		if sf == "streamOptimized" {
			run(t, dir, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, name)
			os.Remove(filepath.Join(dir, src))
		}
		fmt.Fprintf(&vmx, "scsi0:%d.present = \"TRUE\"\nscsi0:%d.fileName = \"%s\"\n", i, i, name)
	}
	vmx.WriteString("annotation = \"notes\"\nchecksum = \"x\"") // no final newline
	os.WriteFile(filepath.Join(dir, "vm.vmx"), []byte(vmx.String()), 0o644)
	os.WriteFile(filepath.Join(dir, "vm.nvram"), testkit.RandBytes(8684), 0o644)
	os.WriteFile(filepath.Join(dir, "vm.vswp"), testkit.RandBytes(3<<20+512), 0o600)
	os.WriteFile(filepath.Join(dir, "vm-Snapshot1.vmsn"), testkit.RandBytes(100000), 0o644)
	os.WriteFile(filepath.Join(dir, "vm.log"), []byte("log stays plain\n"), 0o644)
	return dir
}

func snapshotDir(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = raw
	}
	return out
}

// decryptMatches decrypts the VM in dir and requires every file of before
// back byte for byte.
func decryptMatches(t *testing.T, ops *vmops.VMOps, dir string, before map[string][]byte) {
	t.Helper()
	if err := ops.Decrypt(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
	final := snapshotDir(t, dir)
	for name, raw := range before {
		if !bytes.Equal(final[name], raw) {
			t.Errorf("%s differs after decrypt", name)
		}
	}
}

// encryptedMadeVM is makeVM, encrypted: its directory, the files before
// encryption, the operations and their KEK.
func encryptedMadeVM(t *testing.T) (string, map[string][]byte, *vmops.VMOps, keys.KeyRef) {
	t.Helper()
	dir := makeVM(t)
	before := snapshotDir(t, dir)
	ops, kek := newTestOps(t)
	if err := ops.Encrypt(context.Background(), dir, kek); err != nil {
		t.Fatal(err)
	}
	return dir, before, ops, kek
}

func newTestOps(t *testing.T) (*vmops.VMOps, keys.KeyRef) {
	kr := keys.NewKeyring()
	t.Cleanup(kr.Close)
	kr.SetProvider("mem", &testkit.MemKeyServer{})
	kek, err := kr.Create(context.Background(), "mem", "kek")
	if err != nil {
		t.Fatal(err)
	}
	return &vmops.VMOps{Keys: kr}, kek.Ref
}

func TestVMEncryptDecrypt(t *testing.T) {
	dir := makeVM(t)
	before := snapshotDir(t, dir)
	ops, kek := newTestOps(t)
	ctx := context.Background()
	var events int
	ops.Progress = func(vmops.ProgressEvent) { events++ }
	if err := ops.Encrypt(ctx, dir, kek); err != nil {
		t.Fatal(err)
	}
	if events == 0 {
		t.Error("no progress events")
	}
	after := snapshotDir(t, dir)
	if _, ok := after[vm.JournalName]; ok {
		t.Fatal("journal left behind")
	}
	vmxText := string(after["vm.vmx"])
	for _, want := range []string{"encryption.keySafe = \"vmware:key/list/(pair/(fqid/", "encryption.data = ", "vmcryptd.vmId = "} {
		if !strings.Contains(vmxText, want) {
			t.Errorf("vmx lacks %q:\n%s", want, vmxText)
		}
	}
	if strings.Contains(vmxText, "s3cret") || strings.Contains(vmxText, "notes") {
		t.Error("sensitive vmx lines still in plain text")
	}
	if !strings.Contains(string(after["disk0.vmdk"]), "encryptionKeys=\"vmware:key/list/") {
		t.Errorf("flat descriptor lacks encryptionKeys:\n%s", after["disk0.vmdk"])
	}
	if !bytes.Equal(after["vm.log"], before["vm.log"]) {
		t.Error("log changed")
	}
	// Every data file is a container, and no 4 KiB-aligned plaintext block
	// of any original file (other than all-zero ones) survives anywhere.
	var all [][]byte
	for name, raw := range after {
		if strings.HasSuffix(name, ".vmx") || strings.HasSuffix(name, ".log") || (strings.HasSuffix(name, ".vmdk") && bytes.HasPrefix(raw, []byte("# Disk DescriptorFile"))) {
			continue
		}
		if string(raw[:8]) != container.ContainerMagic {
			t.Errorf("%s is not encrypted", name)
		}
		all = append(all, raw)
	}
	for name, raw := range before {
		if strings.HasSuffix(name, ".vmx") || strings.HasSuffix(name, ".log") || bytes.HasPrefix(raw, []byte("# Disk DescriptorFile")) {
			continue
		}
		for off := 0; off+4096 <= len(raw); off += 4096 {
			blk := raw[off : off+4096]
			if container.IsZero(blk) {
				continue
			}
			for _, enc := range all {
				if bytes.Contains(enc, blk) {
					t.Fatalf("plaintext block %d of %s found in an encrypted file", off/4096, name)
				}
			}
		}
	}
	if err := ops.Encrypt(ctx, dir, kek); err == nil {
		t.Fatal("encrypting twice succeeded")
	}
	if err := ops.Decrypt(ctx, dir); err != nil {
		t.Fatal(err)
	}
	final := snapshotDir(t, dir)
	for name, raw := range before {
		if !bytes.Equal(final[name], raw) {
			t.Errorf("%s differs after decrypt\n%q\n%q", name, final[name], raw)
		}
	}
	if len(final) != len(before) {
		t.Errorf("file set changed: %d files, was %d", len(final), len(before))
	}
}

func TestVMRekey(t *testing.T) {
	dir, before, ops, kek := encryptedMadeVM(t)
	ctx := context.Background()
	enc := snapshotDir(t, dir)
	kek2, err := ops.Keys.Create(ctx, "mem", "kek2")
	if err != nil {
		t.Fatal(err)
	}
	if err := ops.RekeyShallow(ctx, dir, kek2.Ref); err != nil {
		t.Fatal(err)
	}
	shallow := snapshotDir(t, dir)
	l, err := vm.LoadLayout(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	entries, err := keys.DecodeKeySafe(l.KeySafe)
	if err != nil || len(entries) != 1 || entries[0].KEK != kek2.Ref {
		t.Fatalf("vmx keySafe not moved to the new KEK: %+v %v", entries, err)
	}
	for _, d := range l.Disks {
		e, err := keys.DecodeKeySafe(d.KeySafe)
		if err != nil || e[0].KEK != kek2.Ref {
			t.Fatalf("disk %s keySafe not moved to the new KEK", d.Name)
		}
	}
	// Data untouched by a shallow rekey (payloads identical; an extent's
	// header holds a copy of its keySafe, which is rewrapped).
	if !bytes.Equal(enc["vm.vswp"], shallow["vm.vswp"]) || !bytes.Equal(enc["disk0-flat.vmdk"][container.HeaderSize:], shallow["disk0-flat.vmdk"][container.HeaderSize:]) {
		t.Fatal("shallow rekey rewrote data")
	}
	// The old KEK is no longer needed: forget it; everything still opens.
	ops.Keys.Forget(kek)
	if err := ops.RekeyDeep(ctx, dir, kek2.Ref); err != nil {
		t.Fatal(err)
	}
	deep := snapshotDir(t, dir)
	if bytes.Equal(deep["vm.vswp"][4096:8192], shallow["vm.vswp"][4096:8192]) {
		t.Fatal("deep rekey did not re-encrypt data")
	}
	decryptMatches(t, ops, dir, before)
}

// A keySafe copied from one disk's descriptor to another's is refused.
func TestVMKeySafeSwapRefused(t *testing.T) {
	dir, _, ops, _ := encryptedMadeVM(t)
	ctx := context.Background()
	// Copy disk0's flat descriptor (with its keySafe and disk id) over
	// disk3's, which names other extents: the disk id no longer matches
	// the extents' headers.
	d0, _ := os.ReadFile(filepath.Join(dir, "disk0.vmdk"))
	d3, _ := os.ReadFile(filepath.Join(dir, "disk3.vmdk"))
	ks0 := lineValue(string(d0), "encryptionKeys")
	swapped := strings.Replace(string(d3), lineValue(string(d3), "encryptionKeys"), ks0, 1)
	os.WriteFile(filepath.Join(dir, "disk3.vmdk"), []byte(swapped), 0o644)
	err := ops.Decrypt(ctx, dir)
	if err == nil || !strings.Contains(err.Error(), "disk3.vmdk") {
		t.Fatalf("decrypt with a swapped keySafe: %v", err)
	}
}

func lineValue(text, key string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, key+"=\"") {
			return strings.TrimSuffix(strings.TrimPrefix(l, key+"=\""), "\"")
		}
	}
	return ""
}

// Every extent carries its disk's keySafe, so a descriptor rewritten
// without its key lines (an editor, qemu-img create over it) loses
// nothing: status names the problem, views refuse the disk instead of
// serving (and overwriting) its ciphertext as plain data, and an explicit
// restore-keys writes the lines back.
func TestDescriptorLosesKeyLines(t *testing.T) {
	dir, before, ops, kek := encryptedMadeVM(t)
	ctx := context.Background()
	l, err := vm.LoadLayout(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range l.Disks {
		for _, e := range d.Extents {
			ks, ok, err := container.ReadEmbeddedKeySafeFile(filepath.Join(dir, e))
			if err != nil || !ok || ks != d.KeySafe {
				t.Errorf("extent %s of %s: embedded keySafe %v %v, want the disk's", e, d.Name, ok, err)
			}
		}
	}
	// inspect names the KEK of the header copy.
	raw, _ := os.ReadFile(filepath.Join(dir, "disk0-flat.vmdk"))
	info, ok := vm.DetectContainer(raw[:container.HeaderSize])
	if !ok || !strings.Contains(fmt.Sprint(info), "kind extent") || !strings.Contains(fmt.Sprint(info), "keySafe copy in header wrapped by "+kek.String()) {
		t.Errorf("inspect line: %v", info)
	}
	// disk0 is monolithicFlat, disk3 twoGbMaxExtentFlat: both have a
	// text descriptor. Strip the key lines, as an editor might.
	strip := func(name string, keep string) {
		p := filepath.Join(dir, name)
		raw, _ := os.ReadFile(p)
		var kept []string
		for _, line := range strings.SplitAfter(string(raw), "\n") {
			if (strings.HasPrefix(line, vm.DescKeySafe+"=") || strings.HasPrefix(line, vm.DDBDiskID+" =")) && !strings.HasPrefix(line, keep) {
				continue
			}
			kept = append(kept, line)
		}
		if err := os.WriteFile(p, []byte(strings.Join(kept, "")), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	strip("disk0.vmdk", "none")
	strip("disk3.vmdk", vm.DDBDiskID)   // keeps its disk id line
	strip("disk2.vmdk", vm.DescKeySafe) // keeps its key, loses its disk id
	st, err := vm.ReadVMStatus(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Problems) != 3 || !strings.Contains(st.Problems[0], "disk disk0.vmdk: its descriptor has no encryptionKeys") ||
		!strings.Contains(st.Problems[0], "vmcryptd disk restore-keys "+dir+" disk0.vmdk") ||
		!strings.Contains(st.Problems[1], "disk2.vmdk: its descriptor has encryptionKeys but no") || !strings.Contains(st.Problems[2], "disk3.vmdk") {
		t.Fatalf("status problems: %q", st.Problems)
	}
	ds := view.NewDatastore(filepath.Dir(dir), ops.Keys, view.DatastoreOptions{})
	defer ds.Close()
	if st, reason, err := ds.Classify(filepath.Base(dir) + "/disk0-flat.vmdk"); err != nil || st != view.FileLocked {
		t.Fatalf("extent of a disk that lost its key lines: %v %q %v, want locked", st, reason, err)
	}
	// The lost lines make the disk plain to VM operations, which leave
	// it alone (a shallow rekey skips it, so its copy keeps the old KEK).
	if _, err := ops.RestoreDiskKeys(ctx, dir, "disk1.vmdk"); err == nil {
		t.Fatal("restore-keys on a sparse disk (key in its own header) succeeded")
	}
	if _, err := ops.RestoreDiskKeys(ctx, dir, "nosuch.vmdk"); err == nil {
		t.Fatal("restore-keys on a disk the VM does not have succeeded")
	}
	for _, name := range []string{"disk0.vmdk", "disk2.vmdk", "disk3.vmdk"} {
		if _, err := ops.RestoreDiskKeys(ctx, dir, name); err != nil {
			t.Fatalf("restore-keys %s: %v", name, err)
		}
		raw, _ := os.ReadFile(filepath.Join(dir, name))
		if descValue(t, raw, vm.DescKeySafe) == "" || descValue(t, raw, vm.DDBDiskID) == "" {
			t.Errorf("%s: key lines not restored:\n%s", name, raw)
		}
	}
	if _, err := ops.RestoreDiskKeys(ctx, dir, "disk0.vmdk"); err == nil {
		t.Fatal("restoring lines that are there succeeded")
	}
	if st, err := vm.ReadVMStatus(dir, nil); err != nil || len(st.Problems) != 0 {
		t.Fatalf("after restore: %v %q", err, st.Problems)
	}
	ds.Forget(dir)
	c, err := ds.Open(filepath.Base(dir)+"/disk0-flat.vmdk", true)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(before["disk0-flat.vmdk"]))
	_, err = c.ReadAt(got, 0)
	c.Close()
	if err != nil || !bytes.Equal(got, before["disk0-flat.vmdk"]) {
		t.Fatalf("disk0-flat after restore: %v, equal=%v", err, bytes.Equal(got, before["disk0-flat.vmdk"]))
	}
	decryptMatches(t, ops, dir, before)
}

// Files of one VM share its DEK: a swap file moved over the nvram opens
// under the key, but its authenticated kind gives it away, and neither
// decrypt nor a deep rekey converts it as the nvram.
func TestVMConvertRefusesKindMismatch(t *testing.T) {
	for _, tc := range []struct {
		op    string
		forge bool
	}{{"decrypt", false}, {"rekey-deep", false}, {"decrypt", true}} {
		op, forge := tc.op, tc.forge
		t.Run(fmt.Sprintf("%s/forged=%v", op, forge), func(t *testing.T) {
			dir := makeVM(t)
			ops, kek := newTestOps(t)
			ctx := context.Background()
			if err := ops.Encrypt(ctx, dir, kek); err != nil {
				t.Fatal(err)
			}
			swap, _ := os.ReadFile(filepath.Join(dir, "vm.vswp"))
			if forge {
				// A newer slot claiming kind nvram, with a stale MAC: it
				// parses, but only the authenticated slot counts.
				s0, s1 := binary.LittleEndian.Uint64(swap[16:]), binary.LittleEndian.Uint64(swap[container.SlotSize+16:])
				src, dst := 0, 1
				if s1 > s0 {
					src, dst = 1, 0
				}
				forged := append([]byte(nil), swap[src*container.SlotSize:(src+1)*container.SlotSize]...)
				forged[10], forged[11] = byte(dst), byte(container.KindNVRAM)
				binary.LittleEndian.PutUint64(forged[16:], max(s0, s1)+1)
				copy(swap[dst*container.SlotSize:], forged)
				if h, err := container.PeekHeader(swap); err != nil || h.Kind != container.KindNVRAM {
					t.Fatalf("forged slot not the newest parsing one: %v %v", h, err)
				}
			}
			if err := os.WriteFile(filepath.Join(dir, "vm.nvram"), swap, 0o644); err != nil {
				t.Fatal(err)
			}
			var err error
			if op == "decrypt" {
				err = ops.Decrypt(ctx, dir)
			} else {
				err = ops.RekeyDeep(ctx, dir, kek)
			}
			if !errors.Is(err, container.ErrKindMismatch) || !strings.Contains(err.Error(), "vm.nvram") {
				t.Fatalf("%s with a swap file as nvram: %v", op, err)
			}
			if got, _ := os.ReadFile(filepath.Join(dir, "vm.nvram")); !bytes.Equal(got, swap) {
				t.Fatal("refused file changed")
			}
		})
	}
}

// Two descriptors naming one extent (an alias, an editor's copy that got
// attached) would have it converted twice, under two keys: the layout
// refuses, before anything is written.
func TestSharedExtentRefused(t *testing.T) {
	ops, kek := newTestOps(t)
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "vm")
	if err := ops.Create(ctx, dir, vmops.CreateSpec{Name: "vm", Disks: []vmops.DiskSpec{{Size: 1 << 20}}, Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "vm.vmdk"))
	var kept []string
	for _, l := range strings.SplitAfter(string(raw), "\n") {
		if !strings.HasPrefix(l, vm.DescKeySafe) && !strings.HasPrefix(l, vm.DDBDiskID) {
			kept = append(kept, l)
		}
	}
	os.WriteFile(filepath.Join(dir, "alias.vmdk"), []byte(strings.Join(kept, "")), 0o644)
	before := snapshotDir(t, dir)
	_, err := ops.AttachDisk(ctx, dir, "alias.vmdk", true)
	if err == nil {
		err = ops.RekeyDeep(ctx, dir, kek)
	}
	if err == nil || !strings.Contains(err.Error(), "belongs to two disks") {
		t.Fatalf("attach or deep rekey with a shared extent: %v", err)
	}
	after := snapshotDir(t, dir)
	for name, b := range before {
		if name != "vm.vmx" && !bytes.Equal(after[name], b) {
			t.Errorf("%s changed", name)
		}
	}
	if op, _ := vm.InterruptedOp(dir); op != "" {
		t.Fatalf("left an interrupted %s", op)
	}
}

// Extents encrypted before every extent carried a keySafe copy (the
// region is zero) get one at the next shallow rekey.
func TestRekeyShallowAddsMissingCopies(t *testing.T) {
	dir, _, ops, kek := encryptedMadeVM(t)
	ctx := context.Background()
	flat := filepath.Join(dir, "disk0-flat.vmdk")
	f, err := os.OpenFile(flat, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(make([]byte, 2*container.KsCopySize), container.KsAreaOff)
	f.Close()
	if _, ok, _ := container.ReadEmbeddedKeySafeFile(flat); ok {
		t.Fatal("copy still there")
	}
	if err := ops.RekeyShallow(ctx, dir, kek); err != nil {
		t.Fatal(err)
	}
	ks, ok, err := container.ReadEmbeddedKeySafeFile(flat)
	desc, _ := os.ReadFile(filepath.Join(dir, "disk0.vmdk"))
	if err != nil || !ok || ks != descValue(t, desc, vm.DescKeySafe) {
		t.Fatalf("copy after rekey: %v %v, want the descriptor's keySafe", ok, err)
	}
}

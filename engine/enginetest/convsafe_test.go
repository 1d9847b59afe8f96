package enginetest

import (
	"bytes"
	"context"
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

// dropLines rewrites path without the lines that start with any prefix
// (what an editor, or a tool that rewrites the file, does to key lines).
func dropLines(t *testing.T, path string, prefixes ...string) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var kept []string
	for _, line := range strings.SplitAfter(string(raw), "\n") {
		drop := false
		for _, p := range prefixes {
			drop = drop || strings.HasPrefix(line, p)
		}
		if !drop {
			kept = append(kept, line)
		}
	}
	if err := os.WriteFile(path, []byte(strings.Join(kept, "")), 0o644); err != nil {
		t.Fatal(err)
	}
}

// unchanged requires dir to hold exactly the files of snap, byte for byte.
func unchanged(t *testing.T, dir string, snap map[string][]byte, what string) {
	t.Helper()
	now := snapshotDir(t, dir)
	for name, raw := range snap {
		if !bytes.Equal(now[name], raw) {
			t.Errorf("%s: %s changed", what, name)
		}
	}
	for name := range now {
		if _, ok := snap[name]; !ok {
			t.Errorf("%s: %s appeared", what, name)
		}
	}
}

// Issue 11 case 2: lost key lines never lead to a partial decrypt nor to
// a second layer of encryption. Each case starts from the steps
// and requires a refusal naming the files with nothing changed, and then
// the way out (restore-keys, or the vmx lines back) to give the data back
// byte for byte.
func TestLostKeyLinesNeverConvertHalf(t *testing.T) {
	for _, tc := range []struct {
		name string
		// lose edits the encrypted VM in dir; restore undoes it the
		// documented way.
		lose    func(t *testing.T, dir string)
		op      string // the operation that must be refused
		refused []string
		restore func(t *testing.T, ops *vmops.VMOps, dir string)
	}{
		{
			name: "descriptor lost encryptionKeys, decrypt",
			lose: func(t *testing.T, dir string) {
				dropLines(t, filepath.Join(dir, "disk0.vmdk"), vm.DescKeySafe+"=", vm.DDBDiskID)
			},
			op:      "decrypt",
			refused: []string{"disk0-flat.vmdk: an encrypted container", "vmcryptd disk restore-keys " + "DIR" + " disk0.vmdk"},
			restore: func(t *testing.T, ops *vmops.VMOps, dir string) {
				if _, err := ops.RestoreDiskKeys(context.Background(), dir, "disk0.vmdk"); err != nil {
					t.Fatalf("restore-keys after the refused decrypt: %v", err)
				}
			},
		},
		{
			name:    "descriptor lost its disk id, deep rekey",
			lose:    func(t *testing.T, dir string) { dropLines(t, filepath.Join(dir, "disk3.vmdk"), vm.DDBDiskID) },
			op:      "rekey-deep",
			refused: []string{"disk3"},
			restore: func(t *testing.T, ops *vmops.VMOps, dir string) {
				if _, err := ops.RestoreDiskKeys(context.Background(), dir, "disk3.vmdk"); err != nil {
					t.Fatalf("restore-keys after the refused rekey: %v", err)
				}
			},
		},
		{
			name: "vmx lost encryption.keySafe, encrypt",
			lose: func(t *testing.T, dir string) {
				p := filepath.Join(dir, "vm.vmx")
				raw, _ := os.ReadFile(p)
				os.WriteFile(p+".bak", raw, 0o600)
				dropLines(t, p, vm.VMXKeySafe)
			},
			op: "encrypt",
			refused: []string{"disk0.vmdk: names a disk key", "disk1.vmdk: already encrypted", "vm.nvram: already encrypted",
				"vm.vswp: already encrypted", "vm-Snapshot1.vmsn: already encrypted"},
			restore: func(t *testing.T, ops *vmops.VMOps, dir string) {
				p := filepath.Join(dir, "vm.vmx")
				raw, _ := os.ReadFile(p + ".bak")
				os.WriteFile(p, raw, 0o644)
				os.Remove(p + ".bak")
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, before, ops, kek := encryptedMadeVM(t)
			ctx := context.Background()
			tc.lose(t, dir)
			snap := snapshotDir(t, dir)
			var err error
			switch tc.op {
			case "decrypt":
				err = ops.Decrypt(ctx, dir)
			case "rekey-deep":
				err = ops.RekeyDeep(ctx, dir, kek)
			case "encrypt":
				err = ops.Encrypt(ctx, dir, kek)
			}
			if err == nil {
				t.Fatalf("%s succeeded", tc.op)
			}
			for _, want := range tc.refused {
				if want = strings.ReplaceAll(want, "DIR", dir); !strings.Contains(err.Error(), want) {
					t.Errorf("%s error lacks %q:\n%v", tc.op, want, err)
				}
			}
			unchanged(t, dir, snap, "refused "+tc.op)
			if op, _ := vm.InterruptedOp(dir); op != "" {
				t.Fatalf("refused %s left the VM marked %q interrupted", tc.op, op)
			}
			tc.restore(t, ops, dir)
			decryptMatches(t, ops, dir, before)
		})
	}
}

// Issue 11 case 3: a disk made through the view of an encrypted VM and
// never attached is a container nothing names; vm decrypt either
// converts it or (here) refuses naming it with nothing changed. Once it
// is attached, the decrypt converts it with the rest.
func TestDecryptRefusesUnattachedViewDisk(t *testing.T) {
	ops, dir, ds := encryptedVM(t, []vmops.DiskSpec{{Size: 1 << 20}})
	ctx := context.Background()
	data := bytes.Repeat([]byte("made through the view "), 4000)
	// monolithicSparse shape: one file holding its own descriptor.
	createThrough(t, ds, "vm/new.vmdk", data)
	// split shape: a text descriptor with two extents.
	createThrough(t, ds, "vm/two.vmdk", nil)
	createThrough(t, ds, "vm/two-f001.vmdk", data)
	createThrough(t, ds, "vm/two-f002.vmdk", data[:8192])
	desc := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n\n" +
		"# Extent description\nRW 2048 FLAT \"two-f001.vmdk\" 0\nRW 2048 FLAT \"two-f002.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n"
	c, err := ds.Open("vm/two.vmdk", false)
	if err != nil {
		t.Fatal(err)
	}
	c.WriteAt([]byte(desc), 0)
	c.Close()
	if _, err := ds.Settle("vm/two.vmdk", neverOpen, nil); err != nil {
		t.Fatal(err)
	}
	ds.Close()
	snap := snapshotDir(t, dir)
	err = ops.Decrypt(ctx, dir)
	for _, want := range []string{"new.vmdk: a container of disk", "two-f001.vmdk: a container", "two-f002.vmdk: a container", "vmcryptd disk attach"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("decrypt error lacks %q: %v", want, err)
		}
	}
	unchanged(t, dir, snap, "refused decrypt")
	if st, err := vm.ReadVMStatus(dir, nil); err != nil || !st.Encrypted || st.Interrupted != "" {
		t.Fatalf("after the refused decrypt: %+v %v", st, err)
	}
	for _, d := range []string{"new.vmdk", "two.vmdk"} {
		if _, err := ops.AttachDisk(ctx, dir, d, true); err != nil {
			t.Fatalf("attach %s: %v", d, err)
		}
	}
	if err := ops.Decrypt(ctx, dir); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][]byte{"new.vmdk": data, "two-f001.vmdk": data, "two-f002.vmdk": data[:8192]} {
		if got, _ := os.ReadFile(filepath.Join(dir, name)); !bytes.Equal(got, want) {
			t.Errorf("%s after decrypt: %d bytes, not the data written through the view", name, len(got))
		}
	}
}

// Issue 11 case 4 and every other vmx reference to a VM-key file: the
// kind a conversion writes is the one the vmx's name gives, and the view
// opens the file with that kind (a .vmsn named by checkpoint.vmState
// used to be written as a vmss and then refused with EIO).
func TestKindsFollowVMXNames(t *testing.T) {
	for _, tc := range []struct {
		name  string // vmx (or vmsd) reference
		vmx   string // lines added to the vmx
		vmsd  string // the snapshot database, if any
		file  string
		want  container.Kind // 0: stays plain
		plain bool
	}{
		{name: "nvram", file: "vm.nvram", want: container.KindNVRAM},
		{name: "nvram, other name", vmx: "nvram = \"firmware.bin\"\n", file: "firmware.bin", want: container.KindNVRAM},
		{name: "sched.swap.derivedName", vmx: "sched.swap.derivedName = \"/vmfs/volumes/ds/vm/vm-1a2b.vswp\"\n", file: "vm-1a2b.vswp", want: container.KindVSWP},
		{name: "vmx swap (unreferenced vmx-*.vswp)", file: "vmx-vm-12345-1.vswp", want: container.KindVSWP},
		{name: "checkpoint.vmState suspend", vmx: "checkpoint.vmState = \"vm-abc.vmss\"\n", file: "vm-abc.vmss", want: container.KindVMSS},
		{name: "checkpoint.vmState memory snapshot", vmx: "checkpoint.vmState = \"vm-Snapshot2.vmsn\"\n", file: "vm-Snapshot2.vmsn", want: container.KindVMSN},
		{name: "vmsd snapshot file", vmsd: ".encoding = \"UTF-8\"\nsnapshot.numSnapshots = \"1\"\nsnapshot0.uid = \"1\"\nsnapshot0.filename = \"vm-Snapshot1.vmsn\"\nsnapshot0.numDisks = \"0\"\n", file: "vm-Snapshot1.vmsn", want: container.KindVMSN},
		{name: "snapshot memory image", file: "vm-Snapshot1.vmem", want: container.KindVMEM},
		{name: "suspend memory image", file: "vm-abc.vmem", want: container.KindVMEM},
		{name: "floppy image (a device's, guest data)", vmx: "floppy0.present = \"TRUE\"\nfloppy0.fileName = \"boot.flp\"\n", file: "boot.flp", plain: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ops, kek := newTestOps(t)
			ctx := context.Background()
			root := t.TempDir()
			dir := vmIn(t, ops, nil, root, "vm")
			addVMX(t, dir, tc.vmx)
			if tc.vmsd != "" {
				os.WriteFile(filepath.Join(dir, "vm.vmsd"), []byte(tc.vmsd), 0o644)
			}
			data := testkit.RandBytes(70000)
			p := filepath.Join(dir, tc.file)
			if tc.file != "vm.nvram" {
				if err := os.WriteFile(p, data, 0o600); err != nil {
					t.Fatal(err)
				}
			} else {
				data, _ = os.ReadFile(p)
			}
			if err := ops.Encrypt(ctx, dir, kek); err != nil {
				t.Fatal(err)
			}
			raw, _ := os.ReadFile(p)
			h, err := container.PeekHeader(raw)
			if tc.plain {
				if err == nil || !bytes.Equal(raw, data) {
					t.Fatalf("%s: a device's file was converted", tc.file)
				}
			} else if err != nil || h.Kind != tc.want {
				t.Fatalf("%s: header %v %v, want kind %s", tc.file, h, err, tc.want)
			}
			st, err := vm.ReadVMStatus(dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range st.Files {
				if f.Name == tc.file && f.Kind != tc.want.String() {
					t.Errorf("status: %s kind %s, want %s", f.Name, f.Kind, tc.want)
				}
			}
			if len(st.Problems) != 0 {
				t.Errorf("status problems: %q", st.Problems)
			}
			ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
			defer ds.Close()
			if !tc.plain {
				c, err := ds.Open("vm/"+tc.file, true)
				if err != nil {
					t.Fatalf("view open: %v", err)
				}
				got := make([]byte, c.Size())
				_, err = c.ReadAt(got, 0)
				c.Close()
				if err != nil || !bytes.Equal(got, data) {
					t.Fatalf("view read %s: %v, equal=%v", tc.file, err, bytes.Equal(got, data))
				}
			}
			if !tc.plain {
				// Made again through the view, it is the same kind of
				// container (a name only the vmx gives included).
				os.Remove(p)
				ds.Forget(dir)
				createThrough(t, ds, "vm/"+tc.file, data)
				raw, _ := os.ReadFile(p)
				if h, err := container.PeekHeader(raw); err != nil || h.Kind != tc.want {
					t.Fatalf("%s made through the view: %v %v, want kind %s", tc.file, h, err, tc.want)
				}
			}
			if err := ops.Decrypt(ctx, dir); err != nil {
				t.Fatal(err)
			}
			if got, _ := os.ReadFile(p); !bytes.Equal(got, data) {
				t.Fatalf("%s differs after decrypt", tc.file)
			}
		})
	}
}

// Issue 12 case 4: in an encrypted VM, a file the VM's text files say is
// encrypted but that is not a valid container is refused by the view,
// reported by vm status and stops every conversion, naming it, with
// nothing changed; a vmx that lost encryption.keySafe while VM-key
// containers exist is a problem, not "plain".
func TestNoSilentDowngrade(t *testing.T) {
	flipMagics := func(t *testing.T, p string) {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for _, off := range []int64{0, container.SlotSize} {
			f.WriteAt([]byte("XMCRYPTD"), off)
		}
	}
	plainFile := func(t *testing.T, p string) { os.WriteFile(p, testkit.RandBytes(1<<20), 0o644) }
	truncate := func(t *testing.T, p string) { os.Truncate(p, 0) }
	for _, tc := range []struct {
		name   string
		file   string
		damage func(t *testing.T, p string)
		vmx    bool // the damage is to the vmx: the VM now reads as plain
	}{
		{"nvram replaced by a plain file", "vm.nvram", plainFile, false},
		{"nvram with both header magics flipped", "vm.nvram", flipMagics, false},
		{"nvram truncated to 0", "vm.nvram", truncate, false},
		{"extent replaced by a plain file", "vm-flat.vmdk", plainFile, false},
		{"extent with both header magics flipped", "vm-flat.vmdk", flipMagics, false},
		{"extent truncated to 0", "vm-flat.vmdk", truncate, false},
		{"vmx lost encryption.keySafe", "vm.nvram", func(t *testing.T, _ string) {}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ops, kek := newTestOps(t)
			ctx := context.Background()
			root := t.TempDir()
			dir := vmIn(t, ops, &kek, root, "vm")
			tc.damage(t, filepath.Join(dir, tc.file))
			if tc.vmx {
				dropLines(t, filepath.Join(dir, "vm.vmx"), vm.VMXKeySafe)
			}
			ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{})
			defer ds.Close()
			if st, reason, err := ds.Classify("vm/" + tc.file); err != nil || st != view.FileLocked || reason == "" {
				t.Errorf("view: %s classified %v %q %v, want refused (locked)", tc.file, st, reason, err)
			}
			st, err := vm.ReadVMStatus(dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, p := range st.Problems {
				found = found || strings.HasPrefix(p, tc.file+": ")
			}
			if !found {
				t.Errorf("status reports no problem for %s: %q", tc.file, st.Problems)
			}
			snap := snapshotDir(t, dir)
			for _, op := range []string{"decrypt", "rekey-deep", "rekey-shallow", "encrypt"} {
				var err error
				switch op {
				case "decrypt":
					err = ops.Decrypt(ctx, dir)
				case "rekey-deep":
					err = ops.RekeyDeep(ctx, dir, kek)
				case "rekey-shallow":
					err = ops.RekeyShallow(ctx, dir, kek)
				case "encrypt":
					err = ops.Encrypt(ctx, dir, kek)
				}
				if err == nil {
					t.Errorf("%s succeeded", op)
				} else if !tc.vmx || op == "encrypt" {
					if !strings.Contains(err.Error(), filepath.Join(dir, tc.file)) && !strings.Contains(err.Error(), "already encrypted") {
						t.Errorf("%s error does not name %s: %v", op, tc.file, err)
					}
				}
				unchanged(t, dir, snap, "refused "+op)
			}
			if tc.vmx || !strings.Contains(tc.name, "plain file") {
				return
			}
			// The way out (docs/FORMAT.md 5.1): to keep the plain data,
			// move it away and copy it back in through the view, which
			// encrypts it under the key its place gives.
			p := filepath.Join(dir, tc.file)
			plain, _ := os.ReadFile(p)
			os.Rename(p, filepath.Join(root, "kept"))
			ds.Forget(dir)
			createThrough(t, ds, "vm/"+tc.file, plain)
			if st, err := vm.ReadVMStatus(dir, nil); err != nil || len(st.Problems) != 0 {
				t.Fatalf("after copying it back through the view: %v %q", err, st.Problems)
			}
			if err := ops.Decrypt(ctx, dir); err != nil {
				t.Fatal(err)
			}
			if got, _ := os.ReadFile(p); !bytes.Equal(got, plain) {
				t.Fatal("the data copied back through the view did not come back")
			}
		})
	}
}

// PlaceProblem is the one rule of what a file must start with; its table.
func TestPlaceProblem(t *testing.T) {
	head := func(b keys.Binding) []byte {
		p := filepath.Join(t.TempDir(), "c")
		c, err := container.CreateContainer(p, testkit.MustDEK(t), container.CreateOptions{Kind: container.KindNVRAM, Binding: b})
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		raw, _ := os.ReadFile(p)
		return raw[:container.HeaderSize]
	}
	vmC, diskC := head(keys.Binding{Purpose: keys.PurposeVM, OwnerID: "v"}), head(keys.Binding{Purpose: keys.PurposeDisk, OwnerID: "d"})
	layout := func(enc bool) *vm.Layout {
		return &vm.Layout{Encrypted: enc, Disks: []*vm.Disk{
			{Name: "d.vmdk", Extents: []string{"d-flat.vmdk"}, KeySafe: "ks", DiskID: "d"},
			{Name: "p.vmdk", Extents: []string{"p-flat.vmdk"}},
			{Name: "s.vmdk", Embedded: true, Extents: []string{"s.vmdk"}},
		}, Files: []vm.DataFile{{Name: "vm.nvram", Kind: container.KindNVRAM}, {Name: "firmware.bin", Kind: container.KindNVRAM}}}
	}
	for _, tc := range []struct {
		enc     bool
		name    string
		head    []byte
		problem bool
	}{
		{true, "d-flat.vmdk", diskC, false},
		{true, "d-flat.vmdk", []byte("plain data"), true},
		{true, "d-flat.vmdk", nil, true},
		{true, "p-flat.vmdk", []byte("plain data"), false}, // a plain disk of an encrypted VM
		{true, "s.vmdk", []byte("KDMV"), false},            // a plain sparse disk: its key would be in its header
		{true, "vm.nvram", vmC, false},
		{true, "vm.nvram", []byte("plain"), true},
		{true, "firmware.bin", nil, true},
		{true, "vm.log", []byte("plain"), false},
		{true, "other.img", diskC, false}, // not judged here (roleOf decides)
		{false, "vm.nvram", []byte("plain"), false},
		{false, "vm.nvram", vmC, true},                // the vmx lost its key lines
		{false, "vm.nvram", diskC, false},             // not a VM key: guest data is possible (roleOf serves it plain)
		{false, "d-flat.vmdk", []byte("plain"), true}, // a keyed disk in a VM whose vmx lost its lines
		{false, "d-flat.vmdk", diskC, true},
		{false, "p-flat.vmdk", diskC, false},
	} {
		got := vm.PlaceProblem(layout(tc.enc), tc.name, tc.head)
		if (got != "") != tc.problem {
			t.Errorf("encrypted=%v %s %q: problem %q, want problem=%v", tc.enc, tc.name, tc.head[:min(len(tc.head), 8)], got, tc.problem)
		}
	}
}

// Issue 12 case 5: user files whose names look like temporary files
// survive every conversion; a temporary file a killed conversion left is
// removed by the next run only because its journal records it.
func TestTempNamesNeverHitUserFiles(t *testing.T) {
	dir, before, ops, kek := encryptedMadeVM(t)
	ctx := context.Background()
	user := map[string][]byte{
		"v.nvram.vmcryptd-tmp":             []byte("a user's file (the old temporary name)"),
		"vm.nvram.vmcryptd-tmp":            []byte("a user's file beside a real nvram"),
		".vm.vmx.tmp-123":                  []byte("an atomic-write-like name"),
		container.TmpPrefix + "0123456789": []byte("a user's file with the new prefix"),
	}
	for n, b := range user {
		os.WriteFile(filepath.Join(dir, n), b, 0o644)
	}
	check := func(what string) {
		t.Helper()
		for n, b := range user {
			if got, err := os.ReadFile(filepath.Join(dir, n)); err != nil || !bytes.Equal(got, b) {
				t.Fatalf("%s: user file %s removed or changed (%v)", what, n, err)
			}
		}
	}
	if err := ops.RekeyDeep(ctx, dir, kek); err != nil {
		t.Fatal(err)
	}
	check("deep rekey")
	// An interrupted decrypt (the rename over an immutable file fails),
	// then a leftover temporary file as a kill -9 would leave it.
	needTool(t, "chattr")
	nv := filepath.Join(dir, "vm.vswp")
	run(t, dir, "chattr", "+i", nv)
	err := ops.Decrypt(ctx, dir)
	run(t, dir, "chattr", "-i", nv)
	if err == nil {
		t.Fatal("decrypt with an immutable swap file succeeded")
	}
	j, err := vm.LoadJournal(dir)
	if err != nil || j == nil || j.TempTag == "" {
		t.Fatalf("journal after the failed decrypt: %+v %v", j, err)
	}
	left := filepath.Join(dir, j.TempPrefix()+"0011223344556677")
	os.WriteFile(left, []byte("half a conversion"), 0o600)
	// A journal's own temporary file, as a kill during its save leaves
	// it: it names itself in its content; one naming another does not.
	jt := container.TmpPrefix + "00112233445566778899aabbccddeeff"
	os.WriteFile(filepath.Join(dir, jt), []byte(`{"version": 1, "op": "decrypt", "self": "`+jt+`"}`), 0o600)
	notOurs := container.TmpPrefix + "ffeeddccbbaa99887766554433221100"
	user[notOurs] = []byte(`{"version": 1, "self": "` + jt + `"}`)
	os.WriteFile(filepath.Join(dir, notOurs), user[notOurs], 0o644)
	check("failed decrypt")
	decryptMatches(t, ops, dir, before)
	for _, p := range []string{left, filepath.Join(dir, jt)} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("the temporary file %s a killed run left was not cleaned: %v", p, err)
		}
	}
	check("resumed decrypt")
}

// Issue 12 case 7: a conversion that fails half way (an immutable file)
// leaves the VM "conversion interrupted"; --abort rolls it back to the
// state before it started, even while the file that stopped it is still
// immutable, and the VM then works as before.
func TestAbortInterruptedConversion(t *testing.T) {
	needTool(t, "chattr")
	for _, op := range []vm.Op{vm.OpEncrypt, vm.OpDecrypt, vm.OpRekeyDeep} {
		t.Run(string(op), func(t *testing.T) {
			ctx := context.Background()
			var dir string
			var before map[string][]byte
			var ops *vmops.VMOps
			var kek keys.KeyRef
			if op == "encrypt" {
				dir = makeVM(t)
				before = snapshotDir(t, dir)
				ops, kek = newTestOps(t)
			} else {
				dir, before, ops, kek = encryptedMadeVM(t)
			}
			start := snapshotDir(t, dir)
			stStart, err := vm.ReadVMStatus(dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			conv := func() error {
				switch op {
				case "encrypt":
					return ops.Encrypt(ctx, dir, kek)
				case "decrypt":
					return ops.Decrypt(ctx, dir)
				}
				return ops.RekeyDeep(ctx, dir, kek)
			}
			// The disks are converted first, the swap file later: it stops
			// the conversion half way.
			swap := filepath.Join(dir, "vm.vswp")
			run(t, dir, "chattr", "+i", swap)
			t.Cleanup(func() { exec.Command("chattr", "-i", swap).Run() })
			if err := conv(); err == nil {
				t.Fatalf("%s with an immutable swap file succeeded", op)
			}
			if got, _ := vm.InterruptedOp(dir); got != op {
				t.Fatalf("after the failure: interrupted %q, want %q", got, op)
			}
			if changed := snapshotDir(t, dir); bytes.Equal(changed["disk0-flat.vmdk"], start["disk0-flat.vmdk"]) {
				t.Fatal("the failed conversion converted nothing: the abort below would test nothing")
			}
			other := map[vm.Op]vm.Op{"encrypt": "decrypt", "decrypt": "encrypt", "rekey-deep": "encrypt"}[op]
			if err := ops.Abort(ctx, dir, other); err == nil {
				t.Fatalf("abort of a %s while a %s is interrupted succeeded", other, op)
			}
			if err := ops.Abort(ctx, dir, op); err != nil {
				t.Fatalf("abort: %v", err)
			}
			if got, _ := vm.InterruptedOp(dir); got != "" {
				t.Fatalf("after abort: still interrupted (%s)", got)
			}
			noTemps(t, dir)
			if err := ops.Abort(ctx, dir, op); err == nil {
				t.Fatal("a second abort succeeded")
			}
			st, err := vm.ReadVMStatus(dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			if st.Encrypted != stStart.Encrypted || len(st.Problems) != 0 {
				t.Fatalf("after abort: encrypted=%v problems %q", st.Encrypted, st.Problems)
			}
			if op == "encrypt" {
				unchanged(t, dir, start, "aborted encrypt")
				return
			}
			// Same keys as before the conversion: same KEKs and DEKs.
			fp := func(s *vm.VMStatus) map[string]string {
				m := map[string]string{}
				for _, f := range s.Files {
					m[f.Name] = f.Fingerprint
				}
				return m
			}
			if a, b := fp(st), fp(stStart); fmt.Sprint(a) != fmt.Sprint(b) || fmt.Sprint(st.KEKs) != fmt.Sprint(stStart.KEKs) {
				t.Fatalf("keys after abort %v %v, before %v %v", a, st.KEKs, b, stStart.KEKs)
			}
			exec.Command("chattr", "-i", swap).Run()
			decryptMatches(t, ops, dir, before)
		})
	}
}

// Minor of issue 12: a symlink or hard link refused by vm encrypt leaves
// the VM as it was, not "conversion interrupted".
func TestEncryptRefusalLeavesNoJournal(t *testing.T) {
	for _, tc := range []struct {
		name string
		make func(t *testing.T, dir string)
		want string
	}{
		{"nvram is a symlink", func(t *testing.T, dir string) {
			p := filepath.Join(dir, "vm.nvram")
			os.Rename(p, p+".real")
			os.Symlink("vm.nvram.real", p)
		}, "not a regular file"},
		{"extent is a symlink", func(t *testing.T, dir string) {
			p := filepath.Join(dir, "vm-flat.vmdk")
			os.Rename(p, p+".real")
			os.Symlink("vm-flat.vmdk.real", p)
		}, "not a regular file"},
		{"extent has a second hard link", func(t *testing.T, dir string) {
			os.Link(filepath.Join(dir, "vm-flat.vmdk"), filepath.Join(dir, "copy.img"))
		}, "hard links"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ops, kek := newTestOps(t)
			dir := vmIn(t, ops, nil, t.TempDir(), "vm")
			tc.make(t, dir)
			snap := snapshotDir(t, dir)
			err := ops.Encrypt(context.Background(), dir, kek)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("encrypt: %v, want %q", err, tc.want)
			}
			if op, _ := vm.InterruptedOp(dir); op != "" {
				t.Fatalf("refused encrypt left the VM marked %q interrupted", op)
			}
			unchanged(t, dir, snap, "refused encrypt")
		})
	}
}

// A core dump under a host key that cannot be had would stop a decrypt
// at its very end, with every other file already plain: refused first.
func TestDecryptRefusesUnopenableCoreDump(t *testing.T) {
	ops, kek := newTestOps(t)
	ctx := context.Background()
	dir := vmIn(t, ops, &kek, t.TempDir(), "vm")
	other, _ := newTestOps(t) // another host, another key server
	host, err := other.Keys.Create(ctx, "mem", "host")
	if err != nil {
		t.Fatal(err)
	}
	other.HostKEK = &host.Ref
	dump := filepath.Join(t.TempDir(), "dump")
	os.WriteFile(dump, bytes.Repeat([]byte("core "), 5000), 0o600)
	if err := other.EncryptCoreDump(ctx, dump, container.RandomTemp); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(dump)
	os.WriteFile(filepath.Join(dir, "vmware-vmx-77.core"), raw, 0o600)
	snap := snapshotDir(t, dir)
	if err := ops.Decrypt(ctx, dir); err == nil || !strings.Contains(err.Error(), "vmware-vmx-77.core: core dump key") {
		t.Fatalf("decrypt with a core dump it cannot open: %v", err)
	}
	unchanged(t, dir, snap, "refused decrypt")
}

package engine

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
		restore func(t *testing.T, ops *VMOps, dir string)
	}{
		{
			name:    "descriptor lost encryptionKeys, decrypt",
			lose:    func(t *testing.T, dir string) { dropLines(t, filepath.Join(dir, "disk0.vmdk"), DescKeySafe+"=", DDBDiskID) },
			op:      "decrypt",
			refused: []string{"disk0-flat.vmdk: an encrypted container", "vmcryptd disk restore-keys " + "DIR" + " disk0.vmdk"},
			restore: func(t *testing.T, ops *VMOps, dir string) {
				if _, err := ops.RestoreDiskKeys(context.Background(), dir, "disk0.vmdk"); err != nil {
					t.Fatalf("restore-keys after the refused decrypt: %v", err)
				}
			},
		},
		{
			name:    "descriptor lost its disk id, deep rekey",
			lose:    func(t *testing.T, dir string) { dropLines(t, filepath.Join(dir, "disk3.vmdk"), DDBDiskID) },
			op:      "rekey-deep",
			refused: []string{"disk3"},
			restore: func(t *testing.T, ops *VMOps, dir string) {
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
				dropLines(t, p, VMXKeySafe)
			},
			op: "encrypt",
			refused: []string{"disk0.vmdk: names a disk key", "disk1.vmdk: already encrypted", "vm.nvram: already encrypted",
				"vm.vswp: already encrypted", "vm-Snapshot1.vmsn: already encrypted"},
			restore: func(t *testing.T, ops *VMOps, dir string) {
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
			if op, _ := InterruptedOp(dir); op != "" {
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
	ops, dir, ds := encryptedVM(t, []DiskSpec{{Size: 1 << 20}})
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
	if st, err := ReadVMStatus(dir, nil); err != nil || !st.Encrypted || st.Interrupted != "" {
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
		want  Kind // 0: stays plain
		plain bool
	}{
		{name: "nvram", file: "vm.nvram", want: KindNVRAM},
		{name: "nvram, other name", vmx: "nvram = \"firmware.bin\"\n", file: "firmware.bin", want: KindNVRAM},
		{name: "sched.swap.derivedName", vmx: "sched.swap.derivedName = \"/vmfs/volumes/ds/vm/vm-1a2b.vswp\"\n", file: "vm-1a2b.vswp", want: KindVSWP},
		{name: "vmx swap (unreferenced vmx-*.vswp)", file: "vmx-vm-12345-1.vswp", want: KindVSWP},
		{name: "checkpoint.vmState suspend", vmx: "checkpoint.vmState = \"vm-abc.vmss\"\n", file: "vm-abc.vmss", want: KindVMSS},
		{name: "checkpoint.vmState memory snapshot", vmx: "checkpoint.vmState = \"vm-Snapshot2.vmsn\"\n", file: "vm-Snapshot2.vmsn", want: KindVMSN},
		{name: "vmsd snapshot file", vmsd: ".encoding = \"UTF-8\"\nsnapshot.numSnapshots = \"1\"\nsnapshot0.uid = \"1\"\nsnapshot0.filename = \"vm-Snapshot1.vmsn\"\nsnapshot0.numDisks = \"0\"\n", file: "vm-Snapshot1.vmsn", want: KindVMSN},
		{name: "snapshot memory image", file: "vm-Snapshot1.vmem", want: KindVMEM},
		{name: "suspend memory image", file: "vm-abc.vmem", want: KindVMEM},
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
			data := randBytes(70000)
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
			h, err := PeekHeader(raw)
			if tc.plain {
				if err == nil || !bytes.Equal(raw, data) {
					t.Fatalf("%s: a device's file was converted", tc.file)
				}
			} else if err != nil || h.Kind != tc.want {
				t.Fatalf("%s: header %v %v, want kind %s", tc.file, h, err, tc.want)
			}
			st, err := ReadVMStatus(dir, nil)
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
			ds := NewDatastore(root, ops.Keys, "")
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
			if err := ops.Decrypt(ctx, dir); err != nil {
				t.Fatal(err)
			}
			if got, _ := os.ReadFile(p); !bytes.Equal(got, data) {
				t.Fatalf("%s differs after decrypt", tc.file)
			}
		})
	}
}

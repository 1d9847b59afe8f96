package enginetest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
)

// rawOf converts each disk of makeVM to raw with qemu-img, before
// encryption: the reference for what the export must serve.
func rawOf(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for i := range 5 {
		name := fmt.Sprintf("disk%d.vmdk", i)
		raw := filepath.Join(t.TempDir(), "raw")
		run(t, dir, "qemu-img", "convert", "-O", "raw", name, raw)
		b, err := os.ReadFile(raw)
		if err != nil {
			t.Fatal(err)
		}
		out[name] = b
	}
	return out
}

// TestBlockDisk: every subformat of an encrypted VM reads back as qemu
// read it before encryption, maps its holes, and only flat layouts open
// read-write; writes land encrypted.
func TestBlockDisk(t *testing.T) {
	dir := makeVM(t)
	want := rawOf(t, dir)
	ops, kek := newTestOps(t)
	if err := ops.Encrypt(t.Context(), dir, kek); err != nil {
		t.Fatal(err)
	}
	ds := view.NewDatastore(filepath.Dir(dir), ops.Keys, view.DatastoreOptions{})
	t.Cleanup(ds.Close)
	vm := filepath.Base(dir)
	writable := map[string]bool{"disk0.vmdk": true, "disk3.vmdk": true} // monolithicFlat, twoGbMaxExtentFlat
	for i := range 5 {
		name := fmt.Sprintf("disk%d.vmdk", i)
		t.Run(name, func(t *testing.T) {
			bd, err := ds.OpenBlockDisk(vm+"/"+name, true)
			if err != nil {
				t.Fatal(err)
			}
			defer bd.Close()
			got := make([]byte, bd.Size())
			if _, err := bd.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want[name]) {
				t.Fatal("decrypted disk differs from qemu's reading of the plain disk")
			}
			runs, err := bd.Map(0, bd.Size())
			if err != nil {
				t.Fatal(err)
			}
			var data, total int64
			for _, r := range runs {
				total += r.Length
				if !r.Zero {
					data += r.Length
				}
			}
			// 64k + 300k written; grains of 64 KiB round it up.
			if total != bd.Size() || data < 364<<10 || data > 512<<10 {
				t.Fatalf("map: %d bytes of data in %d (%v)", data, total, runs)
			}
			if _, err := bd.WriteAt([]byte{1}, 0); !errors.Is(err, view.ErrBlockReadOnly) {
				t.Fatalf("write to a read-only disk: %v", err)
			}
			rw, err := ds.OpenBlockDisk(vm+"/"+name, false)
			if !writable[name] {
				if err == nil || !strings.Contains(err.Error(), "read-only") {
					t.Fatalf("read-write open of a sparse disk: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			pat := bytes.Repeat([]byte("NBD-PLAINTEXT-PATTERN-"), 3000)
			off := bd.Size() - int64(len(pat)) - 1000 // unaligned, near the end
			if _, err := rw.WriteAt(pat, off); err != nil {
				t.Fatal(err)
			}
			// In place: the caller's buffer is scratch, the disk gets the bytes.
			pat2 := bytes.Repeat([]byte("NBD-IN-PLACE-PATTERN-"), 2000)
			off2 := int64(100_000) // unaligned, past the zeroed range
			scratch := bytes.Clone(pat2)
			if _, err := rw.WriteAtInPlace(scratch, off2); err != nil {
				t.Fatal(err)
			}
			if err := rw.Zero(0, 64<<10, true); err != nil {
				t.Fatal(err)
			}
			if err := rw.Close(); err != nil {
				t.Fatal(err)
			}
			copy(want[name][off:], pat)
			copy(want[name][off2:], pat2)
			clear(want[name][:64<<10])
			again, err := ds.OpenBlockDisk(vm+"/"+name, true)
			if err != nil {
				t.Fatal(err)
			}
			defer again.Close()
			if _, err := again.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want[name]) {
				t.Fatal("written disk reads back wrong")
			}
			for _, f := range again.Files() {
				raw, _ := os.ReadFile(f)
				if bytes.Contains(raw, []byte("NBD-PLAINTEXT-PATTERN-NBD")) || bytes.Contains(raw, []byte("IN-PLACE-PATTERN-NBD")) {
					t.Fatalf("%s holds the written plaintext", f)
				}
			}
		})
	}
	t.Run("busy", func(t *testing.T) {
		ds := view.NewDatastore(filepath.Dir(dir), ops.Keys, view.DatastoreOptions{Busy: func(string) bool { return true }})
		defer ds.Close()
		if _, err := ds.OpenBlockDisk(vm+"/disk0.vmdk", true); !errors.Is(err, view.ErrBusy) {
			t.Fatalf("open while converting: %v", err)
		}
	})
	t.Run("plain where a container belongs", func(t *testing.T) {
		p := filepath.Join(dir, "disk0-flat.vmdk")
		if err := os.WriteFile(p, make([]byte, 3<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := ds.OpenBlockDisk(vm+"/disk0.vmdk", true)
		if err == nil || !strings.Contains(err.Error(), p) {
			t.Fatalf("plain extent of an encrypted disk: %v", err)
		}
	})
}

func TestBlockWritable(t *testing.T) {
	flat := func(typ, access string) vmdk.ExtentInfo {
		return vmdk.ExtentInfo{Extent: vmdk.Extent{Type: typ, Access: access}}
	}
	for _, tc := range []struct {
		name   string
		exts   []vmdk.ExtentInfo
		parent bool
		want   bool
	}{
		{"monolithicFlat", []vmdk.ExtentInfo{flat("FLAT", "RW")}, false, true},
		{"split flat", []vmdk.ExtentInfo{flat("FLAT", "RW"), flat("FLAT", "RW")}, false, true},
		{"vmfs", []vmdk.ExtentInfo{flat("VMFS", "RW")}, false, true},
		{"sparse", []vmdk.ExtentInfo{flat("SPARSE", "RW")}, false, false},
		{"flat then sparse", []vmdk.ExtentInfo{flat("FLAT", "RW"), flat("SPARSE", "RW")}, false, false},
		{"zero extent", []vmdk.ExtentInfo{flat("FLAT", "RW"), flat("ZERO", "RW")}, false, false},
		{"read-only extent", []vmdk.ExtentInfo{flat("FLAT", "RDONLY")}, false, false},
		{"delta", []vmdk.ExtentInfo{flat("FLAT", "RW")}, true, false},
		{"no extents", nil, false, false},
	} {
		if got, why := view.BlockWritable(tc.exts, tc.parent); got != tc.want || (!got && why == "") {
			t.Errorf("%s: %v %q, want %v", tc.name, got, why, tc.want)
		}
	}
}

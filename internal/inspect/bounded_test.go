package inspect

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestPaddedDescriptors: descriptors NUL-padded as QEMU writes them (the
// 512 B of qemu-img convert -O vmdk -o subformat=monolithicFlat, and the
// 4 KiB of a rewrite through a cache=none view) are descriptors for
// inspect, alone and in a VM directory, and their extent is referenced.
func TestPaddedDescriptors(t *testing.T) {
	needQemu(t)
	src := t.TempDir()
	run(t, src, "qemu-img", "create", "-q", "-f", "raw", "r.img", "1M")
	run(t, src, "qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "r.img")
	run(t, src, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", "r.img", "d.vmdk")
	qemuDesc, err := os.ReadFile(filepath.Join(src, "d.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	if len(qemuDesc) != 512 || bytes.IndexByte(qemuDesc, 0) < 0 {
		t.Fatalf("qemu-img convert wrote a %d-byte descriptor without NUL padding; this test needs the padded one", len(qemuDesc))
	}
	text := bytes.TrimRight(qemuDesc, "\x00")
	flat, err := os.ReadFile(filepath.Join(src, "d-flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		desc []byte
	}{
		{"qemu-img convert (512 B)", qemuDesc},
		{"4 KiB padding", append(append([]byte(nil), text...), make([]byte, 4096-len(text))...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			os.WriteFile(filepath.Join(dir, "d.vmdk"), tc.desc, 0o644)
			os.WriteFile(filepath.Join(dir, "d-flat.vmdk"), flat, 0o644)
			os.WriteFile(filepath.Join(dir, "vm.vmx"), []byte("displayName = \"vm\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"d.vmdk\"\n"), 0o644)
			r, err := Inspect(filepath.Join(dir, "d.vmdk"))
			if err != nil {
				t.Fatal(err)
			}
			if r.Kind != KindVMDK || r.Subformat != "monolithicFlat" || r.VirtualSize != 1<<20 || len(r.Extents) != 1 || filepath.Base(r.Extents[0].Path) != "d-flat.vmdk" || len(r.Warnings) != 0 {
				t.Errorf("descriptor report: kind %s subformat %q size %d extents %+v warnings %q", r.Kind, r.Subformat, r.VirtualSize, r.Extents, r.Warnings)
			}
			var out bytes.Buffer
			r.WriteText(&out)
			if !strings.Contains(out.String(), "vmdk (monolithicFlat)") {
				t.Errorf("text:\n%s", out.String())
			}
			r, err = Inspect(dir)
			if err != nil {
				t.Fatal(err)
			}
			seen := 0
			for _, f := range r.Files {
				switch f.Name {
				case "d.vmdk":
					seen++
					if f.Kind != "descriptor" || !f.Referenced {
						t.Errorf("descriptor listed as %+v", f)
					}
				case "d-flat.vmdk":
					seen++
					if f.Kind != "extent" || !f.Referenced || f.Disk != "d.vmdk" {
						t.Errorf("extent listed as %+v", f)
					}
				}
			}
			if seen != 2 {
				t.Errorf("files %+v", r.Files)
			}
			for _, w := range r.Warnings {
				if strings.Contains(w, "not a descriptor") {
					t.Errorf("warning %q", w)
				}
			}
		})
	}
}

// TestFIFOsNeverBlock: a FIFO as the argument, as a VM directory's file
// (named by the vmx or not), as a descriptor's extent or in place of the
// nvram: inspect finishes within a second, names the FIFO in one line
// and never opens it for reading.
func TestFIFOsNeverBlock(t *testing.T) {
	dir := t.TempDir()
	mkfifo := func(name string) {
		t.Helper()
		if err := syscall.Mkfifo(filepath.Join(dir, name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(dir, "vm.vmx"), []byte("displayName = \"vm\"\nnvram = \"vm.nvram\"\nscsi0:0.fileName = \"d.vmdk\"\nscsi0:1.fileName = \"p.vmdk\"\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "d.vmdk"), []byte("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"d-flat.vmdk\" 0\n"), 0o644)
	mkfifo("d-flat.vmdk")
	mkfifo("p.vmdk")
	mkfifo("vm.nvram")
	mkfifo("other.log")
	os.Symlink("d.vmdk", filepath.Join(dir, "link.vmdk"))
	for _, tc := range []struct {
		arg     string
		err     string   // error of Inspect
		warning []string // else: lines the report must carry
	}{
		{"p.vmdk", "p.vmdk: is a FIFO (named pipe), not a regular file; not read", nil},
		{"vm.nvram", "vm.nvram: is a FIFO (named pipe), not a regular file; not read", nil},
		{"link.vmdk", "link.vmdk: is a symbolic link", nil},
		{"d.vmdk", "", []string{"d-flat.vmdk: is a FIFO (named pipe), not a regular file; not read"}},
		{".", "", []string{
			"p.vmdk: is a FIFO (named pipe), not a regular file; not read",
			"vm.nvram: is a FIFO (named pipe), not a regular file; not read",
			"other.log: is a FIFO (named pipe), not a regular file; not read",
			"link.vmdk: is a symbolic link, not a regular file; not read",
		}},
	} {
		t.Run(tc.arg, func(t *testing.T) {
			done := make(chan struct{})
			var r *Report
			var err error
			go func() {
				defer close(done)
				r, err = InspectWith(filepath.Join(dir, tc.arg), Options{Detector: func([]byte) (any, bool) { return nil, false }})
			}()
			select {
			case <-done:
			case <-time.After(time.Second):
				t.Fatal("inspect blocked for a second")
			}
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), dir) || strings.Contains(err.Error(), "\n") {
					t.Fatalf("err = %v, want one line with %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			all := strings.Join(r.Warnings, "\n")
			for _, w := range tc.warning {
				if !strings.Contains(all, w) {
					t.Errorf("no warning %q in:\n%s", w, all)
				}
			}
		})
	}
}

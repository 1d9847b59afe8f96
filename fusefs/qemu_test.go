package fusefs

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// scanFile reports whether pat occurs in the data regions of the file at
// p (holes are zeros; the patterns are not), reading 1 MiB at a time, and
// whether the file starts with the container magic.
func scanFile(t *testing.T, p string, pat []byte) (found, magic bool) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, len(container.ContainerMagic))
	f.ReadAt(head, 0)
	magic = string(head) == container.ContainerMagic
	buf := make([]byte, 1<<20+len(pat))
	fd := int(f.Fd())
	for off := int64(0); off < st.Size(); {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: only a hole remains
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		// Overlap chunks by len(pat) so a match across a boundary counts.
		for pos := start; pos < end; pos += 1 << 20 {
			n, _ := f.ReadAt(buf[:min(int64(len(buf)), end-pos)], pos)
			if bytes.Contains(buf[:n], pat) {
				return true, magic
			}
		}
		off = end
	}
	return false, magic
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestQemuVMDK runs real qemu tools against encrypted VMDKs of all five
// subformats through the view: images made by qemu-img, encrypted in
// place file by file with the engine, must compare identical to the
// originals, pass qemu-img check, take writes through qemu-io, and keep
// only ciphertext at rest.
func TestQemuVMDK(t *testing.T) {
	requireTool(t, "qemu-img", "qemu-io")
	m := mountTest(t, Options{})
	orig := t.TempDir()
	type disk struct {
		subformat string
		size      string
		sparse    bool
	}
	disks := []disk{
		{"monolithicSparse", "64M", true},
		{"monolithicFlat", "64M", false},
		// Over 2 GiB so these really have two extents (the flat ones
		// are sparse files, and the engine keeps their holes).
		{"twoGbMaxExtentSparse", "3G", true},
		{"twoGbMaxExtentFlat", "3G", false},
		{"streamOptimized", "64M", true},
	}
	for _, d := range disks {
		img := filepath.Join(orig, d.subformat+".vmdk")
		if d.subformat == "streamOptimized" {
			src := filepath.Join(orig, "stream-src.vmdk")
			run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", src, d.size)
			run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0xab 0 1M", "-c", "write -P 0x5e 7M 192k", src)
			run(t, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, img)
			os.Remove(src)
		} else {
			run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+d.subformat, img, d.size)
			run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0xab 0 1M", "-c", "write -P 0x5e 7M 192k", img)
		}
	}
	files, err := os.ReadDir(orig)
	if err != nil {
		t.Fatal(err)
	}
	// Copy every file of every disk into the datastore's encrypted
	// directory and convert it in place to a container.
	var names []string
	for _, f := range files {
		names = append(names, f.Name())
		src := filepath.Join(orig, f.Name())
		dst := m.backing("enc/" + f.Name())
		run(t, "cp", "--sparse=always", src, dst)
		opts := m.b.createOptions(0o644)
		opts.Kind = container.KindExtent
		if err := container.EncryptFile(context.Background(), dst, m.b.dek, opts, nil); err != nil {
			t.Fatalf("encrypt %s: %v", f.Name(), err)
		}
		raw, _ := os.ReadFile(dst)
		if !bytes.HasPrefix(raw, []byte(container.ContainerMagic)) {
			t.Fatalf("%s is not a container after EncryptFile", f.Name())
		}
	}
	t.Logf("files: %v", names)

	for _, d := range disks {
		t.Run(d.subformat, func(t *testing.T) {
			o := filepath.Join(orig, d.subformat+".vmdk")
			v := m.view("enc/" + d.subformat + ".vmdk")
			if out := run(t, "qemu-img", "compare", "-f", "vmdk", "-F", "vmdk", o, v); !strings.Contains(out, "identical") {
				t.Fatalf("compare original vs view: %s", out)
			}
			if d.sparse {
				run(t, "qemu-img", "check", "-f", "vmdk", v)
			}
			// Write through the view and read it back.
			run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0xcd 1M 1M", v)
			run(t, "qemu-io", "-f", "vmdk", "-c", "read -P 0xcd 1M 1M", "-c", "read -P 0xab 0 1M", "-c", "read -P 0x5e 7M 192k", v)
			// The same write on the original keeps them identical.
			run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0xcd 1M 1M", o)
			if out := run(t, "qemu-img", "compare", "-f", "vmdk", "-F", "vmdk", o, v); !strings.Contains(out, "identical") {
				t.Fatalf("compare after writing both: %s", out)
			}
			if d.sparse {
				run(t, "qemu-img", "check", "-f", "vmdk", v)
			}
		})
	}
	if t.Failed() {
		t.Logf("view log:\n%s", m.logs.String())
		return
	}
	// At rest: every file is a container and none holds the patterns.
	waitReleased(t, m.v)
	for _, pat := range []byte{0xab, 0xcd, 0x5e} {
		run := bytes.Repeat([]byte{pat}, 64)
		for _, name := range names {
			found, magic := scanFile(t, m.backing("enc/"+name), run)
			if !magic {
				t.Errorf("%s is not a container at rest", name)
			}
			if found {
				t.Errorf("pattern %#x found at rest in %s", pat, name)
			}
		}
	}
	// And the view still shows the data after a fresh open.
	for _, d := range disks {
		v := m.view("enc/" + d.subformat + ".vmdk")
		run(t, "qemu-io", "-r", "-f", "vmdk", "-c", "read -P 0xcd 1M 1M", v)
	}
}

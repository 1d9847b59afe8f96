package vmdir

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestScanPaddedDescriptorAndFIFO: a descriptor NUL-padded as QEMU writes
// it (512 B and 4 KiB) is a descriptor and its extent is referenced; a
// FIFO in the directory is reported, never opened, and does not block.
func TestScanPaddedDescriptorAndFIFO(t *testing.T) {
	for _, size := range []int{512, 4096} {
		dir := t.TempDir()
		desc := flatDesc("d-flat.vmdk")
		os.WriteFile(filepath.Join(dir, "vm.vmx"), []byte("scsi0:0.fileName = \"d.vmdk\"\nscsi0:1.fileName = \"pipe.vmdk\"\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "d.vmdk"), append([]byte(desc), make([]byte, size-len(desc))...), 0o644)
		os.WriteFile(filepath.Join(dir, "d-flat.vmdk"), make([]byte, 4096), 0o644)
		// An unreferenced padded descriptor is guessed from its head.
		os.WriteFile(filepath.Join(dir, "spare.vmdk"), append([]byte(desc), make([]byte, size-len(desc))...), 0o644)
		if err := syscall.Mkfifo(filepath.Join(dir, "pipe.vmdk"), 0o644); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		d, err := Scan(dir)
		if err != nil {
			t.Fatal(err)
		}
		if el := time.Since(start); el > time.Second {
			t.Errorf("Scan took %v", el)
		}
		want := map[string]struct {
			kind Kind
			ref  bool
		}{"d.vmdk": {KindDescriptor, true}, "d-flat.vmdk": {KindExtent, true}, "spare.vmdk": {KindDescriptor, false}}
		for name, w := range want {
			f, ok := d.Lookup(name)
			if !ok || f.Kind != w.kind || f.Referenced != w.ref {
				t.Errorf("%d: %s: %+v, want kind %s referenced %v", size, name, f, w.kind, w.ref)
			}
		}
		if _, ok := d.Lookup("pipe.vmdk"); ok {
			t.Errorf("FIFO listed as a file")
		}
		found := false
		for _, p := range d.Problems {
			if strings.Contains(p, "pipe.vmdk: is a FIFO (named pipe), not a regular file; not read") {
				found = true
			}
		}
		if !found {
			t.Errorf("no problem line for the FIFO: %q", d.Problems)
		}
	}
}

// TestScanBounds: a directory of too many entries and a vmx that is a
// FIFO are refused with one line naming them.
func TestScanBounds(t *testing.T) {
	dir := t.TempDir()
	if err := syscall.Mkfifo(filepath.Join(dir, "vm.vmx"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A FIFO is not a .vmx file of the directory.
	if _, err := Scan(dir); err == nil || !strings.Contains(err.Error(), "no .vmx") {
		t.Errorf("FIFO vmx: %v", err)
	}
	big := t.TempDir()
	os.WriteFile(filepath.Join(big, "vm.vmx"), nil, 0o644)
	for i := range MaxEntries {
		f, err := os.Create(filepath.Join(big, "f"+strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if _, err := Scan(big); err == nil || !strings.Contains(err.Error(), "more than 65536 entries") || !strings.Contains(err.Error(), big) {
		t.Errorf("huge directory: %v", err)
	}
}

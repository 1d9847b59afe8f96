package vmdk

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestGenerateFuzzSeeds rewrites testdata/fuzz from qemu-made files. It
// runs only when VMCRYPTD_GEN_SEEDS=1, since the committed corpus must stay
// stable: VMCRYPTD_GEN_SEEDS=1 go test -run TestGenerateFuzzSeeds ./formats/vmdk/
func TestGenerateFuzzSeeds(t *testing.T) {
	if os.Getenv("VMCRYPTD_GEN_SEEDS") != "1" {
		t.Skip("set VMCRYPTD_GEN_SEEDS=1 to regenerate the fuzz seed corpus")
	}
	needQemu(t)
	dir := t.TempDir()
	mk := func(name string, opts string, size string, ws []qemuWrite) []byte {
		run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", opts, name, size)
		qemuWrites(t, dir, name, ws)
		return readFile(t, filepath.Join(dir, name))
	}
	small := []qemuWrite{{0, 4096, 0xab}, {512 * 1024, 1024, 0xcd}}
	sparse := mk("s.vmdk", "subformat=monolithicSparse", "1M", small)
	zeroed := mk("z.vmdk", "subformat=monolithicSparse,zeroed_grain=on", "1M", append(small, qemuWrite{0, 64 * 1024, -1}))
	run(t, dir, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "s.vmdk", "so.vmdk")
	stream := readFile(t, filepath.Join(dir, "so.vmdk"))
	// qemu pads the stream with zero sectors after the last grain; one
	// zero sector (it reads as an EOS marker) is enough for a seed.
	end := len(stream)
	for end > SectorSize && bytes.Count(stream[end-SectorSize:end], []byte{0}) == SectorSize {
		end -= SectorSize
	}
	stream = stream[:min(end+SectorSize, len(stream))]
	footer := streamImage(t, bytes.Repeat([]byte("stream-with-footer"), 4000), 128, "createType=\"streamOptimized\"\nRW 141 SPARSE \"x.vmdk\"\n")

	write := func(fuzz, name string, b []byte) {
		p := filepath.Join("testdata", "fuzz", fuzz, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	_ = sparse // same structure as the zeroed-grain image; kept out to keep the corpus small
	// The monolithicSparse images are 128 KiB of mostly zeros: too big
	// for the mutator to work with, so only their descriptors are seeds
	// and the handmade images in FuzzSparse cover their structure.
	_ = zeroed
	write("FuzzSparse", "qemu-streamOptimized", stream)
	write("FuzzStreamMarkers", "qemu-streamOptimized", stream)
	write("FuzzStreamMarkers", "vmware-style-footer", footer)
	for _, sub := range []string{"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"} {
		b := mk(sub+".vmdk", "subformat="+sub, "3G", nil)
		if IsSparse(b) {
			s, err := OpenSparse(bytes.NewReader(b), int64(len(b)), sub)
			if err != nil {
				t.Fatal(err)
			}
			b, _ = s.EmbeddedDescriptor()
		}
		write("FuzzDescriptor", "qemu-"+sub, b)
	}
}

package vmdk

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const flatText = "# Disk DescriptorFile\nversion=1\nCID=13d58050\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"d-flat.vmdk\" 0\n\nddb.adapterType = \"ide\"\n"

func pad(s string, n int) []byte { return append([]byte(s), make([]byte, n-len(s))...) }

func TestIsDescriptorText(t *testing.T) {
	for _, tc := range []struct {
		name string
		head []byte
		want bool
	}{
		{"plain text", []byte(flatText), true},
		{"magic only", []byte(DescriptorMagic), true},
		{"NUL padded to 512", pad(flatText, 512), true},
		{"NUL padded to 4096", pad(flatText, 4096), true},
		{"CRLF", []byte(strings.ReplaceAll(flatText, "\n", "\r\n")), true},
		{"empty", nil, false},
		{"short prefix of the magic", []byte("# Disk Desc"), false},
		{"no magic", []byte("version=1\ncreateType=\"monolithicFlat\"\n"), false},
		{"magic not at offset 0", []byte("\n" + flatText), false},
		{"all zeros", make([]byte, 512), false},
		{"qemu leftover after NUL", append(pad(flatText, 300), []byte("RW 1 FLAT \"x\"\n")...), true},
		{"one control byte after padding", append(pad(flatText, 511), 1), false},
		{"binary after NUL", append(pad(flatText, 300), 0x7f, 0x05, 0xff), false},
		{"sparse magic", []byte("KDMV\x01\x00\x00\x00"), false},
		{"container magic", []byte("VMCRYPTD" + DescriptorMagic), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := IsDescriptorText(tc.head); got != tc.want {
				t.Errorf("IsDescriptorText(%q) = %v, want %v", tc.head[:min(len(tc.head), 40)], got, tc.want)
			}
		})
	}
}

// TestDescriptorNULPadding parses descriptors as QEMU pads them: the text
// is understood, the padding comes back at the end, and a line set later
// goes into the text, not after the padding.
func TestDescriptorNULPadding(t *testing.T) {
	for _, n := range []int{512, 4096} {
		b := pad(flatText, n)
		d, err := ParseDescriptor(b)
		if err != nil {
			t.Fatalf("%d: %v", n, err)
		}
		if !bytes.Equal(d.Bytes(), b) {
			t.Fatalf("%d: round trip differs", n)
		}
		if x := d.Extents(); len(x) != 1 || x[0].Filename != "d-flat.vmdk" || x[0].Sectors != 2048 {
			t.Fatalf("%d: extents %+v", n, x)
		}
		if err := d.Set("ddb.new", "v"); err != nil {
			t.Fatal(err)
		}
		out := d.Bytes()
		if !bytes.HasSuffix(out, make([]byte, n-len(flatText))) || bytes.IndexByte(bytes.TrimRight(out, "\x00"), 0) >= 0 {
			t.Fatalf("%d: after Set the padding is not at the end: %q", n, out)
		}
		d2, err := ParseDescriptor(out)
		if err != nil {
			t.Fatal(err)
		}
		if v, _ := d2.Get("ddb.new"); v != "v" {
			t.Fatalf("ddb.new = %q", v)
		}
	}
}

func TestDescriptorLimits(t *testing.T) {
	ext := "RW 1 FLAT \"x.vmdk\" 0\n"
	for _, tc := range []struct {
		name, text, err string
	}{
		{"binary after NUL", flatText[:40] + "\x00\x01\x02" + flatText[40:], "binary data after the NUL at offset 40"},
		{"too many lines", strings.Repeat("\n", MaxDescriptorLines+1), "more than 65536 lines"},
		{"too many extents", DescriptorMagic + "\n" + strings.Repeat(ext, MaxDescriptorExtents+1), "more than 32768 extents"},
		{"too large", strings.Repeat("#", MaxDescriptorSize+1), "exceeds limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseDescriptor([]byte(tc.text))
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
		})
	}
	// At the limits: accepted.
	if _, err := ParseDescriptor([]byte(DescriptorMagic + "\n" + strings.Repeat(ext, MaxDescriptorExtents))); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseDescriptor([]byte(strings.Repeat("\n", MaxDescriptorLines))); err != nil {
		t.Fatal(err)
	}
}

// TestOpenQemuPaddedDescriptor opens what qemu-img convert writes for a
// monolithicFlat target: a descriptor NUL-padded to 512 bytes.
func TestOpenQemuPaddedDescriptor(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "raw", "r.img", "1M")
	run(t, dir, "qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "r.img")
	run(t, dir, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", "r.img", "d.vmdk")
	b, err := os.ReadFile(filepath.Join(dir, "d.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.IndexByte(b, 0) < 0 {
		t.Fatalf("qemu-img no longer pads the descriptor (%d bytes); the test needs a padded one", len(b))
	}
	if !IsDescriptorText(b) {
		t.Fatalf("qemu's descriptor not recognised: %q", b)
	}
	d, err := Open(filepath.Join(dir, "d.vmdk"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, 64<<10)
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0xab}, 64<<10)) {
		t.Fatalf("read through the padded descriptor: %v", err)
	}
}

// TestDiskGrainDirectoryBudget names one sparse extent with an 8 MiB
// grain directory (the most one extent may have) several times: the disk
// refuses to hold more than twice that, instead of loading it per line.
func TestDiskGrainDirectoryBudget(t *testing.T) {
	dir := t.TempDir()
	h := SparseHeader{Version: 1, Flags: 3, Capacity: 1 << 37, GrainSize: 128, NumGTEsPerGT: 512, GDOffset: 1, RGDOffset: 1, OverHead: 1,
		SingleEndLineChar: '\n', NonEndLineChar: ' ', DoubleEndLineChar1: '\r', DoubleEndLineChar2: '\n'}
	if h.GDEntries() != maxGDEntries {
		t.Fatalf("test header has %d directory entries", h.GDEntries())
	}
	b, _ := h.MarshalBinary()
	f, err := os.Create(filepath.Join(dir, "s.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	f.Write(b)
	f.Truncate(SectorSize + maxGDEntries*4) // holes: an empty directory
	f.Close()
	one := "RW 137438953472 SPARSE \"s.vmdk\"\n"
	for _, tc := range []struct {
		n  int
		ok bool
	}{{1, true}, {2, true}, {3, false}, {100, false}} {
		os.WriteFile(filepath.Join(dir, "d.vmdk"), []byte(DescriptorMagic+"\ncreateType=\"twoGbMaxExtentSparse\"\n"+strings.Repeat(one, tc.n)), 0o644)
		d, err := Open(filepath.Join(dir, "d.vmdk"), nil)
		if tc.ok {
			if err != nil {
				t.Errorf("%d extents: %v", tc.n, err)
			} else {
				d.Close()
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), "exceed 4194304 entries in all") || !strings.Contains(err.Error(), "s.vmdk") {
			t.Errorf("%d extents: err = %v", tc.n, err)
		}
		if d != nil {
			d.Close()
		}
	}
}

// TestGrainCountsMatchesTables checks the batched walk of GrainCounts
// against the tables one by one, for directories with adjacent runs,
// repeated, overlapping and empty entries.
func TestGrainCountsMatchesTables(t *testing.T) {
	const gtSectors = 4 // 512 entries
	for _, tc := range []struct {
		name string
		gd   func(i int) uint32
	}{
		{"adjacent", func(i int) uint32 { return uint32(64 + i*gtSectors) }},
		{"all the same", func(int) uint32 { return 64 }},
		{"alternating", func(i int) uint32 { return uint32(64 + (i%2)*gtSectors) }},
		{"overlapping", func(i int) uint32 { return uint32(64 + i) }},
		{"gaps and holes", func(i int) uint32 {
			if i%3 == 0 {
				return 0
			}
			return uint32(64 + i*2*gtSectors)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const entries = 40
			h := SparseHeader{Version: 1, Flags: 1 | FlagZeroedGrainGTE, Capacity: entries * 512 * 128, GrainSize: 128, NumGTEsPerGT: 512, GDOffset: 1, OverHead: 1,
				SingleEndLineChar: '\n', NonEndLineChar: ' ', DoubleEndLineChar1: '\r', DoubleEndLineChar2: '\n'}
			img, _ := h.MarshalBinary()
			img = append(img, make([]byte, (64+entries*2*gtSectors+8)*SectorSize)...)
			for i := range entries {
				binary.LittleEndian.PutUint32(img[SectorSize+4*i:], tc.gd(i))
			}
			// Table area: a pattern of holes, zeroed and allocated grains.
			for off := 64 * SectorSize; off+4 <= len(img); off += 4 {
				binary.LittleEndian.PutUint32(img[off:], uint32(off/4%5)) // 0, 1 (zeroed), 2..4
			}
			s, err := OpenSparse(bytes.NewReader(img), int64(len(img)), "x.vmdk")
			if err != nil {
				t.Fatal(err)
			}
			var wantA, wantZ int64
			for i := range entries {
				gt, err := s.GrainTable(i)
				if err != nil {
					t.Fatal(err)
				}
				for _, gte := range gt {
					switch gte {
					case 0:
					case 1:
						wantZ++
					default:
						wantA++
					}
				}
			}
			a, z, err := s.GrainCounts()
			if err != nil || a != wantA || z != wantZ {
				t.Fatalf("GrainCounts = %d, %d, %v; tables say %d, %d", a, z, err, wantA, wantZ)
			}
		})
	}
}

// TestDescriptorQemuCIDRewrite: qemu rewrites a descriptor in place when
// the CID changes; a CID with fewer hex digits ends the new text earlier
// and leaves the old text's last bytes after its NUL (seen once in
// TestBlockDisk: "NUL byte at offset 343"). Such a file reads as qemu
// reads it, up to the NUL, and round-trips byte for byte.
func TestDescriptorQemuCIDRewrite(t *testing.T) {
	old := pad(flatText, 512)
	newText := strings.Replace(flatText, "CID=13d58050", "CID=d5805", 1) // 3 digits shorter
	b := append([]byte(nil), old...)
	copy(b, newText)
	b[len(newText)] = 0 // the terminator; the old text's last 2 bytes stay after it
	if !IsDescriptorText(b) {
		t.Fatal("qemu's rewritten descriptor is not descriptor text")
	}
	d, err := ParseDescriptor(b)
	if err != nil {
		t.Fatal(err)
	}
	if cid, _ := d.Get("CID"); cid != "d5805" {
		t.Fatalf("CID = %q", cid)
	}
	if x := d.Extents(); len(x) != 1 || x[0].Filename != "d-flat.vmdk" {
		t.Fatalf("extents %+v", x)
	}
	if !bytes.Equal(d.Bytes(), b) {
		t.Fatal("round trip differs")
	}
	// A line set later goes into the text; the tail stays after it, so a
	// reader (which stops at the first NUL) sees the new line.
	if err := d.Set("ddb.new", "v"); err != nil {
		t.Fatal(err)
	}
	d2, err := ParseDescriptor(d.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := d2.Get("ddb.new"); v != "v" {
		t.Fatalf("ddb.new after rewrite = %q", v)
	}
}

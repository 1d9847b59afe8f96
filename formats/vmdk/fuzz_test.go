package vmdk

import (
	"bytes"
	"io"
	"testing"
)

// Fuzz seeds beyond these small synthetic ones live in testdata/fuzz; they
// were cut from qemu-made files (see TestGenerateFuzzSeeds).

func FuzzDescriptor(f *testing.F) {
	for _, s := range handMade {
		f.Add([]byte(s))
	}
	f.Add([]byte("encryptionKeys=\"vmware:key/list/(pair/(fqid/<VMWARE-NULL>/local/ASEA,HMAC%2dSHA%2d256,kIc7))\"\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := ParseDescriptor(b)
		if err != nil {
			return
		}
		if !bytes.Equal(d.Bytes(), b) {
			t.Fatalf("round trip differs for %q", b)
		}
		d.Extents()
		d.CID()
		d.EncryptionKeys()
		// Mutations keep the text parseable and the values readable.
		if err := d.Set("createType", "vmfs"); err != nil {
			t.Fatal(err)
		}
		if err := d.Set("ddb.fuzz", "x y"); err != nil {
			t.Fatal(err)
		}
		d2, err := ParseDescriptor(d.Bytes())
		if err != nil {
			t.Fatalf("re-parse after Set: %v\n%q", err, d.Bytes())
		}
		if v, _ := d2.Get("createType"); v != "vmfs" {
			t.Fatalf("createType after Set = %q\n%q", v, d.Bytes())
		}
		if v, _ := d2.Get("ddb.fuzz"); v != "x y" {
			t.Fatalf("ddb.fuzz after Set = %q\n%q", v, d.Bytes())
		}
	})
}

// exerciseSparse opens an image and reads it the ways the Disk does.
func exerciseSparse(t *testing.T, img []byte) {
	s, err := OpenSparse(bytes.NewReader(img), int64(len(img)), "fuzz.vmdk")
	if err != nil {
		return
	}
	s.EmbeddedDescriptor()
	s.GrainCounts()
	buf := make([]byte, 64<<10)
	size := s.Size()
	// Read the start, the end and a few grains in between; never the
	// whole (possibly huge) virtual range.
	for _, off := range []int64{0, size / 3, size / 2, max(size-int64(len(buf)), 0), size - 1} {
		if off < 0 {
			continue
		}
		n, err := s.ReadAt(buf, off)
		if n > len(buf) || (err == nil && n != len(buf)) || (err == io.EOF && off+int64(n) != size) {
			t.Fatalf("ReadAt(%d) = %d, %v (size %d)", off, n, err, size)
		}
	}
}

func FuzzSparse(f *testing.F) {
	h := SparseHeader{Version: 1, Flags: 3, Capacity: 64, GrainSize: 8, NumGTEsPerGT: 4, GDOffset: 1, RGDOffset: 1, OverHead: 4,
		SingleEndLineChar: '\n', NonEndLineChar: ' ', DoubleEndLineChar1: '\r', DoubleEndLineChar2: '\n'}
	hb, _ := h.MarshalBinary()
	img := append(hb, make([]byte, 3*SectorSize+2*8*SectorSize)...)
	// GD: 2 tables at sectors 2 and 3; GT0 entry0 -> grain at sector 4.
	img[512], img[516] = 2, 3
	img[1024] = 4
	img[1028] = 1 // GTE 1 without the zeroed flag: a grain at sector 1
	for i := 4 * SectorSize; i < len(img); i++ {
		img[i] = byte(i)
	}
	f.Add(img)
	h.Flags |= FlagZeroedGrainGTE
	hb, _ = h.MarshalBinary()
	f.Add(append(hb, img[SectorSize:]...))
	f.Add(streamImage(f, bytes.Repeat([]byte("abcdefgh"), 1024), 8, "createType=\"streamOptimized\"\n"))
	f.Fuzz(func(t *testing.T, img []byte) { exerciseSparse(t, img) })
}

func FuzzStreamMarkers(f *testing.F) {
	f.Add(streamImage(f, bytes.Repeat([]byte{1, 2, 3, 4}, 4096), 8, ""))
	f.Add(streamImage(f, append(make([]byte, 8192), bytes.Repeat([]byte{9}, 4096)...), 8, "x"))
	f.Fuzz(func(t *testing.T, img []byte) {
		size := int64(len(img))
		var last int64 = -1
		err := ScanMarkers(bytes.NewReader(img), size, SectorSize, func(m Marker) error {
			if m.Offset <= last || m.Offset%SectorSize != 0 || m.Offset >= size {
				t.Fatalf("marker offset %d after %d (size %d)", m.Offset, last, size)
			}
			last = m.Offset
			return nil
		})
		_ = err
		exerciseSparse(t, img)
	})
}

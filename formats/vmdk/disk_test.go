package vmdk

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	gib = int64(1) << 30
)

// TestDiskMatchesQemu creates disks with qemu-img in every subformat qemu
// writes, fills scattered ranges with qemu-io, and checks that Disk reads
// exactly what "qemu-img convert -O raw" produces.
func TestDiskMatchesQemu(t *testing.T) {
	needQemu(t)
	scattered := func(size int64) []qemuWrite {
		ws := []qemuWrite{
			{0, 512, 0x01},
			{4 * kib, 64 * kib, 0xab},
			{size / 2, 128 * kib, 0xcd},
			{size - 4*kib, 4 * kib, 0xef},
		}
		if size > 2*gib {
			// Straddle the 2 GiB extent boundary of the twoGb variants.
			ws = append(ws, qemuWrite{2*gib - 32*kib, 64 * kib, 0x5a}, qemuWrite{4*gib + 512, 1536, 0x77})
		}
		return ws
	}
	odd := mib + 3*SectorSize
	cases := []struct {
		subformat string
		size      int64
		writes    []qemuWrite
	}{
		{"monolithicSparse", odd, []qemuWrite{{0, 4 * kib, 0x11}, {mib, 3 * SectorSize, 0x22}}},
		{"monolithicSparse", 64 * mib, scattered(64 * mib)},
		{"monolithicSparse", 64 * mib, nil},
		{"monolithicFlat", odd, []qemuWrite{{mib, 3 * SectorSize, 0x33}}},
		{"monolithicFlat", 64 * mib, scattered(64 * mib)},
		{"twoGbMaxExtentSparse", 5 * gib, scattered(5 * gib)},
		{"twoGbMaxExtentSparse", odd, []qemuWrite{{512, 512, 0x44}}},
		{"twoGbMaxExtentFlat", 5 * gib, scattered(5 * gib)},
		{"twoGbMaxExtentFlat", odd, []qemuWrite{{mib + 1024, 512, 0x55}}},
		{"streamOptimized", odd, []qemuWrite{{0, 64 * kib, 0x66}, {mib, 3 * SectorSize, 0x67}}},
		{"streamOptimized", 64 * mib, scattered(64 * mib)},
		{"streamOptimized", 5 * gib, scattered(5 * gib)},
	}
	for _, tc := range cases {
		name := tc.subformat + "/" + itoa(tc.size)
		if tc.writes == nil {
			name += "/empty"
		}
		t.Run(name, func(t *testing.T) {
			if testing.Short() && tc.size > gib {
				t.Skip("multi-GiB case skipped in -short mode")
			}
			dir := t.TempDir()
			file := "disk.vmdk"
			if tc.subformat == "streamOptimized" {
				// qemu cannot write a stream in place; convert like an export.
				run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", "src.vmdk", itoa(tc.size))
				qemuWrites(t, dir, "src.vmdk", tc.writes)
				run(t, dir, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src.vmdk", file)
			} else {
				run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+tc.subformat, file, itoa(tc.size))
				qemuWrites(t, dir, file, tc.writes)
			}
			run(t, dir, "qemu-img", "convert", "-f", "vmdk", "-O", "raw", file, "raw.img")
			d := mustOpen(t, filepath.Join(dir, file))
			if d.CreateType() != tc.subformat {
				t.Errorf("CreateType = %q, want %q", d.CreateType(), tc.subformat)
			}
			var info struct {
				VirtualSize int64 `json:"virtual-size"`
			}
			if err := json.Unmarshal([]byte(run(t, dir, "qemu-img", "info", "--output=json", file)), &info); err != nil {
				t.Fatal(err)
			}
			if d.Size() != info.VirtualSize {
				t.Errorf("Size = %d, qemu-img info says %d", d.Size(), info.VirtualSize)
			}
			compareWithRaw(t, d, filepath.Join(dir, "raw.img"))
			// Unaligned reads across grain and extent boundaries.
			raw := make([]byte, min(d.Size(), 8*mib))
			rf, err := os.Open(filepath.Join(dir, "raw.img"))
			if err != nil {
				t.Fatal(err)
			}
			_, err = io.ReadFull(rf, raw)
			rf.Close()
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range [][2]int64{{1, 70001}, {4*kib - 3, 65 * kib}, {int64(len(raw)) - 777, 777}} {
				got := make([]byte, r[1])
				if _, err := d.ReadAt(got, r[0]); err != nil {
					t.Fatalf("ReadAt(%d,%d): %v", r[0], r[1], err)
				}
				if !bytes.Equal(got, raw[r[0]:r[0]+r[1]]) {
					t.Fatalf("unaligned ReadAt(%d,%d) differs", r[0], r[1])
				}
			}
			// Reads that run past the end return the tail and io.EOF.
			buf := make([]byte, 4096)
			n, err := d.ReadAt(buf, d.Size()-100)
			if n != 100 || err != io.EOF {
				t.Errorf("ReadAt past end = %d, %v; want 100, EOF", n, err)
			}
			// Every extent file exists and is listed once.
			for _, p := range d.ExtentFiles() {
				if _, err := os.Stat(p); err != nil {
					t.Error(err)
				}
			}
			for i := range d.Extents() {
				if _, err := d.AllocatedBytes(i); err != nil {
					t.Errorf("AllocatedBytes(%d): %v", i, err)
				}
			}
		})
	}
}

func TestDiskAllocatedBytes(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "d.vmdk", "64M")
	// 4k+64k touches grains 0 and 1; 10M+1M touches 16 grains.
	qemuWrites(t, dir, "d.vmdk", []qemuWrite{{4 * kib, 64 * kib, 0xab}, {10 * mib, mib, 0xcd}})
	d := mustOpen(t, filepath.Join(dir, "d.vmdk"))
	got, err := d.AllocatedBytes(0)
	if err != nil {
		t.Fatal(err)
	}
	if want := 18 * 64 * kib; got != want {
		t.Errorf("AllocatedBytes = %d, want %d", got, want)
	}
	if g := d.Extents()[0].GrainSize; g != 64*kib {
		t.Errorf("GrainSize = %d", g)
	}

	run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "f.vmdk", "64M")
	qemuWrites(t, dir, "f.vmdk", []qemuWrite{{mib, mib, 0xab}})
	f := mustOpen(t, filepath.Join(dir, "f.vmdk"))
	got, err = f.AllocatedBytes(0)
	if err != nil {
		t.Fatal(err)
	}
	// The flat file is sparse: about 1 MiB is backed (file systems may
	// round to their block size).
	if got < mib || got > 4*mib {
		t.Errorf("flat AllocatedBytes = %d, want about 1 MiB", got)
	}
}

func TestZeroedGrains(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "z.vmdk", "8M")
	qemuWrites(t, dir, "z.vmdk", []qemuWrite{{0, mib, 0x11}, {64 * kib, 128 * kib, -1}, {4 * mib, 64 * kib, -1}})
	run(t, dir, "qemu-img", "convert", "-O", "raw", "z.vmdk", "raw.img")
	d := mustOpen(t, filepath.Join(dir, "z.vmdk"))
	s := d.exts[0].sparse
	if s.Header().Flags&FlagZeroedGrainGTE == 0 {
		t.Fatal("qemu did not set the zeroed-grain flag")
	}
	alloc, zeroed, err := s.GrainCounts()
	if err != nil {
		t.Fatal(err)
	}
	if zeroed == 0 {
		t.Errorf("no zeroed grains found (allocated %d)", alloc)
	}
	compareWithRaw(t, d, filepath.Join(dir, "raw.img"))
}

// TestStreamFooter reads a VMware-style stream (directory at the end,
// footer) and checks qemu reads it the same way.
func TestStreamFooter(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	data := make([]byte, 3*mib+SectorSize)
	for i := range 40 * kib {
		data[i] = byte(i * 7)
	}
	copy(data[2*mib:], bytes.Repeat([]byte("vmcryptd"), 9000))
	copy(data[len(data)-SectorSize:], bytes.Repeat([]byte{0xee}, SectorSize))
	desc := "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n" +
		"# Extent description\nRW " + itoa(int64(len(data)/SectorSize)) + " SPARSE \"s.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n"
	img := streamImage(t, data, 128, desc)
	writeFile(t, filepath.Join(dir, "s.vmdk"), img)
	d := mustOpen(t, filepath.Join(dir, "s.vmdk"))
	got := make([]byte, len(data))
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("stream read differs from source data")
	}
	if !d.EmbeddedDescriptor() || d.CreateType() != "streamOptimized" {
		t.Errorf("embedded descriptor not found: %q", d.CreateType())
	}
	run(t, dir, "qemu-img", "convert", "-O", "raw", "s.vmdk", "raw.img")
	compareWithRaw(t, d, filepath.Join(dir, "raw.img"))

	var kinds []MarkerType
	err := ScanMarkers(bytes.NewReader(img), int64(len(img)), int64(d.exts[0].sparse.hdr.OverHead)*SectorSize, func(m Marker) error {
		kinds = append(kinds, m.Type)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "grain grain grain grain GT GD footer EOS"
	var s []string
	for _, k := range kinds {
		s = append(s, k.String())
	}
	if strings.Join(s, " ") != want {
		t.Errorf("markers = %s, want %s", strings.Join(s, " "), want)
	}
}

func TestScanMarkersQemuStream(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "src.vmdk", "16M")
	qemuWrites(t, dir, "src.vmdk", []qemuWrite{{0, 64 * kib, 1}, {8 * mib, 256 * kib, 2}})
	run(t, dir, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src.vmdk", "s.vmdk")
	d := mustOpen(t, filepath.Join(dir, "s.vmdk"))
	s := d.exts[0].sparse
	alloc, _, err := s.GrainCounts()
	if err != nil {
		t.Fatal(err)
	}
	img := readFile(t, filepath.Join(dir, "s.vmdk"))
	grains := 0
	err = ScanMarkers(bytes.NewReader(img), int64(len(img)), int64(s.hdr.OverHead)*SectorSize, func(m Marker) error {
		if m.Type == MarkerGrain {
			grains++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if int64(grains) != alloc || alloc != 5 {
		t.Errorf("grain markers %d, allocated grains %d, want 5", grains, alloc)
	}
}

// TestDeltaDisk reads a child disk through to its parent.
func TestDeltaDisk(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "base.vmdk", "8M")
	qemuWrites(t, dir, "base.vmdk", []qemuWrite{{0, 2 * mib, 0xbb}})
	run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "backing_file=base.vmdk,backing_fmt=vmdk", "child.vmdk", "8M")
	qemuWrites(t, dir, "child.vmdk", []qemuWrite{{mib, 64 * kib, 0xcc}, {5 * mib, kib, 0xdd}})
	run(t, dir, "qemu-img", "convert", "-O", "raw", "child.vmdk", "raw.img")
	d := mustOpen(t, filepath.Join(dir, "child.vmdk"))
	if d.Parent() == nil {
		t.Fatal("parent not opened")
	}
	compareWithRaw(t, d, filepath.Join(dir, "raw.img"))
}

func TestResolveExtentPath(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		ok         bool
	}{
		{"disk-flat.vmdk", "/vm/disk-flat.vmdk", true},
		{"sub/disk.vmdk", "/vm/sub/disk.vmdk", true},
		{"./disk.vmdk", "/vm/disk.vmdk", true},
		{"a..b.vmdk", "/vm/a..b.vmdk", true},
		{"../other/disk.vmdk", "", false},
		{"sub/../../x", "", false},
		{"sub/..", "", false},
		{"/etc/passwd", "", false},
		{"", "", false},
		{"a\x00b", "", false},
	} {
		got, err := ResolveExtentPath("/vm", tc.name)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ResolveExtentPath(%q) = %q, %v", tc.name, got, err)
		}
	}
}

func TestOpenRejectsEscapingExtents(t *testing.T) {
	dir := t.TempDir()
	vm := filepath.Join(dir, "vm")
	os.Mkdir(vm, 0o755)
	writeFile(t, filepath.Join(dir, "secret"), make([]byte, 1024))
	for _, name := range []string{"../secret", filepath.Join(dir, "secret")} {
		desc := "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2 FLAT \"" + name + "\" 0\n"
		writeFile(t, filepath.Join(vm, "d.vmdk"), []byte(desc))
		_, err := Open(filepath.Join(vm, "d.vmdk"), nil)
		if err == nil || !strings.Contains(err.Error(), "d.vmdk") || !strings.Contains(err.Error(), "extent 0") {
			t.Errorf("extent %q: err = %v, want a clear rejection", name, err)
		}
	}
	// A symlink inside the directory that points outside is refused by
	// the default opener too.
	if err := os.Symlink(filepath.Join(dir, "secret"), filepath.Join(vm, "link-flat.vmdk")); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(vm, "d.vmdk"), []byte("createType=\"monolithicFlat\"\nRW 2 FLAT \"link-flat.vmdk\" 0\n"))
	if _, err := Open(filepath.Join(vm, "d.vmdk"), nil); err == nil {
		t.Error("symlink escaping the VM directory was followed")
	}
}

// TestCustomOpener checks that every file goes through Options.Open, which
// is how the engine will substitute decrypting readers.
func TestCustomOpener(t *testing.T) {
	dir := t.TempDir()
	data := bytes.Repeat([]byte{0x42}, 4096)
	writeFile(t, filepath.Join(dir, "d.vmdk"), []byte("createType=\"monolithicFlat\"\nRW 8 FLAT \"d-flat.vmdk\" 0\n"))
	writeFile(t, filepath.Join(dir, "d-flat.vmdk"), make([]byte, 4096)) // "ciphertext"
	var opened []string
	open := func(p string) (File, error) {
		opened = append(opened, filepath.Base(p))
		b := readFile(t, p)
		if filepath.Base(p) == "d-flat.vmdk" {
			b = data
		}
		return memFile{bytes.NewReader(b)}, nil
	}
	d, err := Open(filepath.Join(dir, "d.vmdk"), &Options{Open: open})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, 4096)
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through custom opener: %v", err)
	}
	if strings.Join(opened, ",") != "d.vmdk,d-flat.vmdk" {
		t.Errorf("opened %v", opened)
	}
}

type memFile struct{ *bytes.Reader }

func (memFile) Close() error { return nil }

func TestUnsupportedExtentType(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "d.vmdk"), []byte("createType=\"vmfsSparse\"\nRW 8 VMFSSPARSE \"d-delta.vmdk\"\n"))
	_, err := Open(filepath.Join(dir, "d.vmdk"), nil)
	if err == nil || !strings.Contains(err.Error(), "VMFSSPARSE not supported") {
		t.Errorf("err = %v", err)
	}
}

func TestVMFSFlatAndZero(t *testing.T) {
	dir := t.TempDir()
	flat := bytes.Repeat([]byte{7}, 8*SectorSize)
	writeFile(t, filepath.Join(dir, "v-flat.vmdk"), flat)
	writeFile(t, filepath.Join(dir, "v.vmdk"), []byte("# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\nparentCID=ffffffff\r\ncreateType=\"vmfs\"\r\n\r\n"+
		"# Extent description\r\nRW 8 VMFS \"v-flat.vmdk\"\r\nRW 4 ZERO\r\n\r\nddb.adapterType = \"lsilogic\"\r\n"))
	d := mustOpen(t, filepath.Join(dir, "v.vmdk"))
	if d.Size() != 12*SectorSize || d.CreateType() != "vmfs" {
		t.Fatalf("size %d type %q", d.Size(), d.CreateType())
	}
	got := make([]byte, d.Size())
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(append([]byte{}, flat...), make([]byte, 4*SectorSize)...)
	if !bytes.Equal(got, want) {
		t.Error("vmfs/zero read differs")
	}
	if fs := d.ExtentFiles(); len(fs) != 1 {
		t.Errorf("ExtentFiles = %v", fs)
	}
}

func TestSparseHeaderLimits(t *testing.T) {
	base := SparseHeader{Version: 1, Flags: 3, Capacity: 2048, GrainSize: 128, NumGTEsPerGT: 512, GDOffset: 1, OverHead: 1,
		SingleEndLineChar: '\n', NonEndLineChar: ' ', DoubleEndLineChar1: '\r', DoubleEndLineChar2: '\n'}
	mk := func(f func(h *SparseHeader)) []byte {
		h := base
		f(&h)
		b, _ := h.MarshalBinary()
		return append(b, make([]byte, 4096)...)
	}
	for _, tc := range []struct {
		name string
		img  []byte
		want string
	}{
		{"text-mode copy", mk(func(h *SparseHeader) { h.DoubleEndLineChar1 = '\n' }), "newline"},
		{"huge directory", mk(func(h *SparseHeader) { h.Capacity = 1 << 62; h.GrainSize = 1; h.NumGTEsPerGT = 1 }), "too large"},
		{"2^60-byte directory", mk(func(h *SparseHeader) { h.Capacity = 1 << 54; h.GrainSize = 1 << 4; h.NumGTEsPerGT = 1 << 4 }), "too large"},
		{"directory beyond EOF", mk(func(h *SparseHeader) { h.Capacity = 1 << 36 }), "beyond file size"},
		{"directory over 8 MiB", mk(func(h *SparseHeader) { h.Capacity = 1<<37 + 1 }), "too large"},
		{"gd offset overflow", mk(func(h *SparseHeader) { h.GDOffset = 1 << 60 }), "beyond file size"},
		{"grain size not power of 2", mk(func(h *SparseHeader) { h.GrainSize = 100 }), "grain size"},
		{"descriptor beyond EOF", mk(func(h *SparseHeader) { h.DescriptorOffset = 1; h.DescriptorSize = 1000 }), "descriptor"},
		{"bad version", mk(func(h *SparseHeader) { h.Version = 9 }), "version"},
		{"GD at end without footer", mk(func(h *SparseHeader) { h.GDOffset = GDAtEnd }), "footer"},
	} {
		_, err := OpenSparse(bytes.NewReader(tc.img), int64(len(tc.img)), "x.vmdk")
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "x.vmdk: ") {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestSparseHeaderRoundTrip(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	for _, sub := range []string{"monolithicSparse", "streamOptimized"} {
		run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sub, sub+".vmdk", "1G")
		img := readFile(t, filepath.Join(dir, sub+".vmdk"))
		h, err := ParseSparseHeader(img)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := h.MarshalBinary()
		if !bytes.Equal(b, img[:SectorSize]) {
			t.Errorf("%s: header does not round-trip", sub)
		}
		if h.SingleEndLineChar != '\n' || h.NonEndLineChar != ' ' || h.DoubleEndLineChar1 != '\r' || h.DoubleEndLineChar2 != '\n' {
			t.Errorf("%s: newline detection bytes %q", sub, []byte{h.SingleEndLineChar, h.NonEndLineChar, h.DoubleEndLineChar1, h.DoubleEndLineChar2})
		}
		if got := h.StreamOptimized(); got != (sub == "streamOptimized") {
			t.Errorf("%s: StreamOptimized = %v", sub, got)
		}
	}
}

func TestCorruptGrainErrors(t *testing.T) {
	data := bytes.Repeat([]byte{1}, 64*int(kib))
	img := streamImage(t, data, 128, "")
	// Point the first grain's marker at a different LBA.
	s, err := OpenSparse(bytes.NewReader(img), int64(len(img)), "c.vmdk")
	if err != nil {
		t.Fatal(err)
	}
	st, sector, _ := s.lookup(0)
	if st != grainAllocated {
		t.Fatal("grain 0 not allocated")
	}
	bad := append([]byte{}, img...)
	bad[sector*SectorSize] = 9
	s, err = OpenSparse(bytes.NewReader(bad), int64(len(bad)), "c.vmdk")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReadAt(make([]byte, 512), 0); err == nil || !strings.Contains(err.Error(), "LBA") {
		t.Errorf("err = %v", err)
	}
	// Corrupt the compressed bytes.
	bad = append([]byte{}, img...)
	for i := range 20 {
		bad[int(sector)*SectorSize+14+i] ^= 0xff
	}
	s, _ = OpenSparse(bytes.NewReader(bad), int64(len(bad)), "c.vmdk")
	if _, err := s.ReadAt(make([]byte, 512), 0); err == nil {
		t.Error("corrupt deflate data read without error")
	}
}

// TestConcurrentReads hammers one disk from several goroutines; run with
// -race it checks the grain table and grain caches.
func TestConcurrentReads(t *testing.T) {
	data := make([]byte, mib/2)
	for i := range data {
		data[i] = byte(i / 4096)
	}
	img := streamImage(t, data, 8, "")
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "s.vmdk"), img)
	d := mustOpen(t, filepath.Join(dir, "s.vmdk"))
	errc := make(chan error, 4)
	for g := range 4 {
		go func() {
			buf := make([]byte, 6000)
			for i := range 200 {
				off := int64((i*7919 + g*104729) % (len(data) - len(buf)))
				if _, err := d.ReadAt(buf, off); err != nil {
					errc <- err
					return
				}
				if !bytes.Equal(buf, data[off:off+int64(len(buf))]) {
					errc <- errors.New("concurrent read returned wrong data")
					return
				}
			}
			errc <- nil
		}()
	}
	for range 4 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	s := d.exts[0].sparse
	if len(s.GrainDirectory()) != 1 {
		t.Errorf("GD %v", s.GrainDirectory())
	}
	gt, err := s.GrainTable(0)
	if err != nil || gt[0] != 0 || gt[1] == 0 || len(gt) != 512 {
		t.Errorf("GrainTable(0): %v", err)
	}
	if _, err := s.GrainTable(1); err == nil {
		t.Error("GrainTable(1) out of range accepted")
	}
}

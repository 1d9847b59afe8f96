package vmdk

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// needQemu skips the test when qemu-img/qemu-io are missing, except in CI
// (CI=true), where a missing tool must fail the run rather than silently
// skip the real-format checks.
func needQemu(t testing.TB) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s not found in CI (install Debian package qemu-utils): %v", tool, err)
			}
			t.Skipf("%s not found; install qemu-utils to run this test", tool)
		}
	}
}

// run runs a command in dir and fails the test on error.
func run(t testing.TB, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qemuWrite is one qemu-io write: pattern byte at offset, length bytes;
// pattern < 0 means "write -z" (zeroes).
type qemuWrite struct {
	off, n  int64
	pattern int
}

func qemuWrites(t testing.TB, dir, file string, ws []qemuWrite) {
	t.Helper()
	if len(ws) == 0 {
		return
	}
	args := []string{"-f", "vmdk"}
	for _, w := range ws {
		if w.pattern < 0 {
			args = append(args, "-c", "write -z "+itoa(w.off)+" "+itoa(w.n))
		} else {
			args = append(args, "-c", "write -P "+itoa(int64(w.pattern))+" "+itoa(w.off)+" "+itoa(w.n))
		}
	}
	args = append(args, file)
	run(t, dir, "qemu-io", args...)
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// compareWithRaw checks that d reads exactly the bytes of the raw image at
// rawPath, in 1 MiB chunks so that multi-GiB sparse images stay cheap.
func compareWithRaw(t testing.TB, d *Disk, rawPath string) {
	t.Helper()
	raw, err := os.Open(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	st, _ := raw.Stat()
	if st.Size() != d.Size() {
		t.Fatalf("virtual size %d, qemu raw image is %d", d.Size(), st.Size())
	}
	const chunk = 1 << 20
	a, b := make([]byte, chunk), make([]byte, chunk)
	for off := int64(0); off < d.Size(); off += chunk {
		n := min(chunk, d.Size()-off)
		if _, err := d.ReadAt(a[:n], off); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
		}
		if _, err := raw.ReadAt(b[:n], off); err != nil {
			t.Fatalf("raw ReadAt(%d): %v", off, err)
		}
		if !bytes.Equal(a[:n], b[:n]) {
			for i := range n {
				if a[i] != b[i] {
					t.Fatalf("mismatch at virtual offset %d: got %#x, qemu %#x", off+i, a[i], b[i])
				}
			}
		}
	}
}

// streamImage builds a VMware-style stream-optimized extent in memory: the
// header says GDAtEnd, grains follow as compressed markers, then GT
// markers with their tables, a GD marker, the footer and EOS. qemu 7.2
// writes streams differently (tables first), so this exercises the footer
// path that real ESXi exports use. Zero grains in data are left as holes.
func streamImage(t testing.TB, data []byte, grainSectors uint64, desc string) []byte {
	t.Helper()
	le := binary.LittleEndian
	capacity := uint64(len(data)) / SectorSize
	h := SparseHeader{
		Version: 3, Flags: FlagValidNewlineTest | FlagCompressed | FlagMarkers,
		Capacity: capacity, GrainSize: grainSectors, NumGTEsPerGT: 512,
		GDOffset: GDAtEnd, SingleEndLineChar: '\n', NonEndLineChar: ' ',
		DoubleEndLineChar1: '\r', DoubleEndLineChar2: '\n', CompressAlgorithm: CompressDeflate,
	}
	descSectors := uint64(0)
	if desc != "" {
		descSectors = (uint64(len(desc)) + SectorSize) / SectorSize
		h.DescriptorOffset, h.DescriptorSize = 1, descSectors
	}
	h.OverHead = 1 + descSectors
	var out bytes.Buffer
	pad := func() {
		if r := out.Len() % SectorSize; r != 0 {
			out.Write(make([]byte, SectorSize-r))
		}
	}
	hdr, _ := h.MarshalBinary()
	out.Write(hdr)
	if desc != "" {
		d := make([]byte, descSectors*SectorSize)
		copy(d, desc)
		out.Write(d)
	}
	gb := int(grainSectors * SectorSize)
	nGrains := (len(data) + gb - 1) / gb
	gtes := make([]uint32, (nGrains+511)/512*512)
	for g := range nGrains {
		chunk := data[g*gb : min((g+1)*gb, len(data))]
		if bytes.Count(chunk, []byte{0}) == len(chunk) {
			continue
		}
		var z bytes.Buffer
		w := zlib.NewWriter(&z)
		w.Write(chunk)
		w.Close()
		gtes[g] = uint32(out.Len() / SectorSize)
		var m [12]byte
		le.PutUint64(m[:], uint64(g)*grainSectors)
		le.PutUint32(m[8:], uint32(z.Len()))
		out.Write(m[:])
		out.Write(z.Bytes())
		pad()
	}
	meta := func(typ MarkerType, sectors uint64) {
		var m [SectorSize]byte
		le.PutUint64(m[:], sectors)
		le.PutUint32(m[12:], uint32(typ))
		out.Write(m[:])
	}
	gd := make([]uint32, len(gtes)/512)
	for i := range gd {
		meta(MarkerGT, 4)
		gd[i] = uint32(out.Len() / SectorSize)
		binary.Write(&out, le, gtes[i*512:(i+1)*512])
	}
	gdSectors := (uint64(len(gd))*4 + SectorSize - 1) / SectorSize
	meta(MarkerGD, gdSectors)
	gdOff := uint64(out.Len() / SectorSize)
	binary.Write(&out, le, gd)
	pad()
	meta(MarkerFooter, 1)
	f := h
	f.GDOffset = gdOff
	fb, _ := f.MarshalBinary()
	out.Write(fb)
	meta(MarkerEOS, 0)
	return out.Bytes()
}

func writeFile(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustOpen(t testing.TB, path string) *Disk {
	t.Helper()
	d, err := Open(path, nil)
	if err != nil {
		t.Fatalf("Open(%s): %v", filepath.Base(path), err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

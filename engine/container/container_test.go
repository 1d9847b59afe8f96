package container

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/internal/testkit"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"golang.org/x/sys/unix"
)

func newTestContainer(t *testing.T, dek *keys.DEK, unit int) (*Container, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.bin")
	c, err := CreateContainer(path, dek, CreateOptions{Kind: KindExtent, Binding: keys.Binding{Purpose: keys.PurposeDisk, OwnerID: "disk-1"}, UnitSize: unit})
	if err != nil {
		t.Fatal(err)
	}
	return c, path
}

// model is the plaintext the container should hold.
type model []byte

func (m *model) write(p []byte, off int64) {
	if end := off + int64(len(p)); end > int64(len(*m)) {
		*m = append(*m, make([]byte, end-int64(len(*m)))...)
	}
	copy((*m)[off:], p)
}

func checkContents(t *testing.T, c *Container, want []byte) {
	t.Helper()
	if c.Size() != int64(len(want)) {
		t.Fatalf("size %d, want %d", c.Size(), len(want))
	}
	got := make([]byte, len(want))
	if len(want) > 0 {
		if n, err := c.ReadAt(got, 0); n != len(want) || (err != nil && err != io.EOF) {
			t.Fatalf("ReadAt: n=%d err=%v", n, err)
		}
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("contents differ at byte %d", i)
	}
}

func TestContainerReadWrite(t *testing.T) {
	for _, unit := range []int{512, 4096} {
		dek := testkit.MustDEK(t)
		c, path := newTestContainer(t, dek, unit)
		var m model
		rng := rand.New(rand.NewPCG(1, uint64(unit)))
		writes := []struct{ off, n int64 }{
			{0, 1}, {1, 15}, {100, 5000}, {int64(unit) - 3, 7}, {0, int64(unit)},
			{3 * int64(unit), 2 * int64(unit)}, {50000, 1 << 20}, {1<<20 + 7, 300000}, {10, 3},
		}
		for _, w := range writes {
			p := make([]byte, w.n)
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			if n, err := c.WriteAt(p, w.off); err != nil || n != len(p) {
				t.Fatalf("unit %d: WriteAt(%d,%d): %d %v", unit, w.off, w.n, n, err)
			}
			m.write(p, w.off)
			checkContents(t, c, m)
		}
		// Unaligned reads of every shape.
		for i := 0; i < 200; i++ {
			off := rng.Int64N(int64(len(m)))
			n := rng.IntN(70000)
			got := make([]byte, n)
			k, err := c.ReadAt(got, off)
			wantN := min(n, len(m)-int(off))
			if k != wantN || (k < n && err != io.EOF) || (k == n && err != nil) {
				t.Fatalf("ReadAt(%d, %d) = %d, %v", off, n, k, err)
			}
			if !bytes.Equal(got[:k], m[off:off+int64(k)]) {
				t.Fatalf("ReadAt(%d, %d) wrong data", off, n)
			}
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		c2, err := OpenContainer(path, dek, false, "")
		if err != nil {
			t.Fatal(err)
		}
		checkContents(t, c2, m)
		c2.Close()
		// No 16-byte run of the plaintext survives in the file.
		raw, _ := os.ReadFile(path)
		for off := 0; off+64 <= len(m); off += 4096 {
			if IsZero(m[off : off+64]) {
				continue // never-written gaps are holes: zeros on both sides
			}
			if bytes.Contains(raw, m[off:off+64]) {
				t.Fatalf("plaintext at %d visible in backing file", off)
			}
		}
	}
}

func TestContainerHolesAndTruncate(t *testing.T) {
	dek := testkit.MustDEK(t)
	c, path := newTestContainer(t, dek, 4096)
	defer c.Close()
	var m model
	p := bytes.Repeat([]byte{0xab}, 10000)
	c.WriteAt(p, 10<<20)
	m.write(p, 10<<20)
	checkContents(t, c, m)
	// The gap is a hole in the backing file.
	off, err := unix.Seek(int(c.File().Fd()), HeaderSize, unix.SEEK_DATA)
	if err != nil || off < HeaderSize+10<<20-4096 {
		t.Fatalf("SEEK_DATA from header = %d, %v; want the gap to be a hole", off, err)
	}
	// Shrink to a ragged size, grow again: the cut tail reads zeros.
	if err := c.Truncate(10<<20 + 100); err != nil {
		t.Fatal(err)
	}
	m = m[:10<<20+100]
	checkContents(t, c, m)
	if err := c.Truncate(10<<20 + 9000); err != nil {
		t.Fatal(err)
	}
	m = append(m, make([]byte, 8900)...)
	checkContents(t, c, m)
	// Punch a hole across units.
	if err := c.PunchHole(10<<20+50, 8000); err != nil {
		t.Fatal(err)
	}
	clear(m[10<<20+50 : 10<<20+8050])
	checkContents(t, c, m)
	if err := c.Truncate(0); err != nil {
		t.Fatal(err)
	}
	checkContents(t, c, nil)
	st, _ := os.Stat(path)
	if st.Size() != HeaderSize {
		t.Fatalf("empty container is %d bytes", st.Size())
	}
}

func TestContainerOpenErrors(t *testing.T) {
	dek := testkit.MustDEK(t)
	c, path := newTestContainer(t, dek, 4096)
	c.WriteAt(bytes.Repeat([]byte{1}, 20000), 0)
	c.Close()
	orig, _ := os.ReadFile(path)
	dir := t.TempDir()
	variant := func(name string, mutate func([]byte) []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, mutate(bytes.Clone(orig)), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	other := testkit.MustDEK(t)
	tests := []struct {
		name string
		path string
		dek  *keys.DEK
		want error
	}{
		{"wrong key", path, other, ErrWrongKey},
		{"tampered size both slots", variant("t1", func(b []byte) []byte { b[24] ^= 1; b[512+24] ^= 1; return b }), dek, ErrTampered},
		{"truncated payload", variant("t2", func(b []byte) []byte { return b[:len(b)-4096] }), dek, ErrTruncated},
		{"not a container", variant("t3", func(b []byte) []byte { return bytes.Repeat([]byte{'x'}, 8192) }), dek, ErrNotContainer},
		{"tiny file", variant("t4", func(b []byte) []byte { return []byte("MRVN") }), dek, ErrNotContainer},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := OpenContainer(tt.path, tt.dek, true, "")
			if err == nil {
				c.Close()
				t.Fatal("open succeeded")
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if !bytes.Contains([]byte(err.Error()), []byte(tt.path)) {
				t.Fatalf("error does not name the file: %v", err)
			}
		})
	}
}

// One damaged slot costs nothing: both slots hold the same header at
// rest, the container is degraded (refused to writers and conversions),
// and a reader sees every byte (issue 11 case 1).
func TestContainerDamagedSlotKeepsSize(t *testing.T) {
	for _, damage := range []struct {
		name string
		off  int // within the slot
	}{{"mac", SlotSize - 1}, {"size", 24}, {"magic", 0}, {"reserved", 100}} {
		for slot := 0; slot < 2; slot++ {
			t.Run(fmt.Sprintf("%s/slot%d", damage.name, slot), func(t *testing.T) {
				dek := testkit.MustDEK(t)
				c, path := newTestContainer(t, dek, 4096)
				want := bytes.Repeat([]byte("data"), 3000)
				c.WriteAt(want, 0)
				if err := c.Sync(); err != nil {
					t.Fatal(err)
				}
				c.Close()
				raw, _ := os.ReadFile(path)
				raw[slot*SlotSize+damage.off] ^= 0x01
				os.WriteFile(path, raw, 0o600)
				if _, err := OpenContainer(path, dek, true, ""); !errors.Is(err, ErrDegraded) || !strings.Contains(err.Error(), path) {
					t.Fatalf("OpenContainer = %v, want ErrDegraded naming the file", err)
				}
				c2, err := OpenContainerDegraded(path, dek, "")
				if err != nil {
					t.Fatal(err)
				}
				defer c2.Close()
				if c2.Health().Degraded == "" {
					t.Fatal("health does not say degraded")
				}
				got := make([]byte, len(want)+10)
				n, _ := c2.ReadAt(got, 0)
				if c2.Size() != int64(len(want)) || !bytes.Equal(got[:n], want) {
					t.Fatalf("degraded read: size %d, %d bytes, equal %v", c2.Size(), n, bytes.Equal(got[:n], want))
				}
				if _, err := c2.WriteAt([]byte("x"), 0); err == nil {
					if err := c2.Sync(); err == nil {
						t.Fatal("a degraded container accepted a header update")
					}
				}
			})
		}
	}
}

// A header update interrupted between its two writes (or a file from
// before the mirrored protocol) leaves two valid slots with different
// sequence numbers: the newer one is used, and the next update mirrors.
func TestContainerInterruptedHeaderUpdate(t *testing.T) {
	dek := testkit.MustDEK(t)
	c, path := newTestContainer(t, dek, 4096)
	c.WriteAt([]byte("hello"), 0)
	c.Sync()
	old := c.Header() // both slots: size 5
	c.WriteAt([]byte(" world"), 5)
	c.Sync() // both slots: size 11
	keys, err := DeriveContainerKeys(dek)
	if err != nil {
		t.Fatal(err)
	}
	defer keys.Destroy()
	b, err := MarshalSlot(&old, 1, keys.MacKey.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	f.WriteAt(b, SlotSize) // slot 1 back to the older header
	f.Close()
	ro, err := OpenContainer(path, dek, true, "")
	if err != nil {
		t.Fatal(err)
	}
	if h := ro.Health(); h.Degraded != "" || !h.Interrupted || ro.Size() != 11 {
		t.Fatalf("health %+v size %d, want interrupted, size 11", h, ro.Size())
	}
	ro.Close()
	// A writable open mirrors at once.
	c2, err := OpenContainer(path, dek, false, "")
	if err != nil {
		t.Fatal(err)
	}
	if h := c2.Health(); h.Interrupted {
		t.Fatalf("writable open left the slots different: %+v", h)
	}
	c2.WriteAt([]byte("!"), 11)
	if err := c2.Sync(); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	raw, _ := os.ReadFile(path)
	h0, _ := parseSlot(raw[:SlotSize], 0)
	h1, _ := parseSlot(raw[SlotSize:2*SlotSize], 1)
	if h0 == nil || h1 == nil || h0.Seq != h1.Seq || h0.Size != 12 || h1.Size != 12 {
		t.Fatalf("slots after the next update: %+v %+v, want mirrored at size 12", h0, h1)
	}
}

// TestJudgeSlots is the FORMAT.md 3.1 decision, one row per clause.
func TestJudgeSlots(t *testing.T) {
	base := Header{Kind: KindNVRAM, Seq: 7, Size: 100, UnitSize: 4096, PayloadOff: HeaderSize, Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: "vm"}}
	with := func(f func(*Header)) *Header { h := base; f(&h); return &h }
	ok := func(h *Header) slotCheck { return slotCheck{h: h, fpMatch: true, macOK: true} }
	badMAC := func(h *Header) slotCheck { return slotCheck{h: h, fpMatch: true} }
	otherKey := func(h *Header) slotCheck { return slotCheck{h: h} }
	noParse := slotCheck{parseErr: ErrNotContainer}
	tests := []struct {
		name     string
		s        [2]slotCheck
		slot     int
		degraded bool
		interr   bool
		err      error
	}{
		{"mirrored at rest", [2]slotCheck{ok(&base), ok(&base)}, 0, false, false, nil},
		{"same seq, fields differ", [2]slotCheck{ok(&base), ok(with(func(h *Header) { h.Size = 5 }))}, 0, false, false, ErrTampered},
		{"slot 0 newer (update interrupted)", [2]slotCheck{ok(with(func(h *Header) { h.Seq, h.Size = 8, 200 })), ok(&base)}, 0, false, true, nil},
		{"slot 1 newer (old alternating file)", [2]slotCheck{ok(&base), ok(with(func(h *Header) { h.Seq = 9 }))}, 1, false, true, nil},
		{"different seq, different file id", [2]slotCheck{ok(&base), ok(with(func(h *Header) { h.Seq, h.FileID[0] = 8, 1 }))}, 0, false, false, ErrTampered},
		{"different seq, different kind", [2]slotCheck{ok(&base), ok(with(func(h *Header) { h.Seq, h.Kind = 8, KindVSWP }))}, 0, false, false, ErrTampered},
		{"slot 0 fails MAC", [2]slotCheck{badMAC(&base), ok(&base)}, 1, true, false, nil},
		{"slot 1 does not parse", [2]slotCheck{ok(&base), noParse}, 0, true, false, nil},
		{"slot 1 under another key", [2]slotCheck{ok(&base), otherKey(&base)}, 0, true, false, nil},
		{"both fail MAC", [2]slotCheck{badMAC(&base), badMAC(&base)}, 0, false, false, ErrTampered},
		{"other key", [2]slotCheck{otherKey(&base), otherKey(&base)}, 0, false, false, ErrWrongKey},
		{"one other key, one unparsable", [2]slotCheck{otherKey(&base), noParse}, 0, false, false, ErrWrongKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			slot, h, err := judgeSlots(tt.s)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("err = %v, want %v", err, tt.err)
				}
				return
			}
			if err != nil || slot != tt.slot || (h.Degraded != "") != tt.degraded || h.Interrupted != tt.interr {
				t.Fatalf("got slot %d %+v %v, want slot %d degraded %v interrupted %v", slot, h, err, tt.slot, tt.degraded, tt.interr)
			}
		})
	}
}

func TestContainerConcurrent(t *testing.T) {
	dek := testkit.MustDEK(t)
	c, _ := newTestContainer(t, dek, 4096)
	defer c.Close()
	const workers, per = 8, 64 << 10
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			base := int64(w) * per
			p := bytes.Repeat([]byte{byte(w + 1)}, 1000)
			for off := int64(0); off+1000 <= per; off += 1000 {
				if _, err := c.WriteAt(p, base+off); err != nil {
					t.Error(err)
					return
				}
				got := make([]byte, 1000)
				if _, err := c.ReadAt(got, base+off); err != nil && err != io.EOF {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, p) {
					t.Errorf("worker %d: read back wrong data at %d", w, off)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// lockRange must take each stripe once, in ascending order, for ranges
// that wrap around the stripe table too.
func TestLockRangeStripes(t *testing.T) {
	c := &Container{}
	for _, tc := range []struct{ u0, u1 int64 }{
		{0, 0}, {15, 16}, {0, unitsPerStripe*stripeCount - 1}, {unitsPerStripe * (stripeCount - 2), unitsPerStripe*(stripeCount+1) + 3},
		{5, unitsPerStripe * stripeCount * 3},
	} {
		lk := c.lockRange(tc.u0, tc.u1, true)
		// Every stripe in the range is held: TryLock fails on it, and
		// succeeds on the others.
		inRange := map[int]bool{}
		for g := tc.u0 / unitsPerStripe; g <= tc.u1/unitsPerStripe && len(inRange) < stripeCount; g++ {
			inRange[int(g%stripeCount)] = true
		}
		for i := range c.stripes {
			got := c.stripes[i].TryLock()
			if got {
				c.stripes[i].Unlock()
			}
			if got == inRange[i] {
				t.Fatalf("range %v: stripe %d held=%v, want %v", tc, i, !got, inRange[i])
			}
		}
		lk.unlock()
		for i := range c.stripes {
			if !c.stripes[i].TryLock() {
				t.Fatalf("range %v: stripe %d still held after unlock", tc, i)
			}
			c.stripes[i].Unlock()
		}
	}
}

// WriteAtInPlace must leave exactly the file WriteAt leaves, byte for
// byte (same DEK and file id, so the same ciphertext), for every request
// shape, on top of existing data and holes.
func TestWriteAtInPlaceMatchesWriteAt(t *testing.T) {
	for _, unit := range []int{512, 4096} {
		u := int64(unit)
		tests := []struct {
			name    string
			off, n  int64
			initial bool // start from a file with data and a hole
		}{
			{"one byte", 5, 1, true},
			{"inside one unit", 3, u - 10, true},
			{"one whole unit", 2 * u, u, true},
			{"partial head", u + 7, 2*u - 7, true},
			{"partial tail", u, 2*u + 9, true},
			{"head and tail", u - 1, 3*u + 2, true},
			{"two partial units", u - 1, 2, true},
			{"multi-unit aligned", 0, 8 * u, true},
			{"over the hole", 20*u + 3, 30 * u, true},
			{"inside the hole", 35*u + 100, 2 * u, true},
			{"across old EOF", 60*u - 5, 4*u + 10, true},
			{"beyond EOF", 100*u + 11, 3 * u, true},
			{"beyond EOF aligned", 200 * u, 2 * u, true},
			{"empty file unaligned", 13, 5 * u, false},
			{"empty file aligned", 0, 3 * u, false},
			{"large unaligned (parallel)", 3*u + 1, 1<<20 + 2*u + 5, true},
			{"large aligned (parallel)", 4 * u, 1 << 20, false},
		}
		for _, tt := range tests {
			t.Run(fmt.Sprintf("%s/unit%d", tt.name, unit), func(t *testing.T) {
				dek := testkit.MustDEK(t)
				id := [16]byte{1, 2, 3}
				rng := rand.New(rand.NewPCG(uint64(tt.off), uint64(tt.n)))
				fill := func(n int64) []byte {
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(rng.Uint32())
					}
					return p
				}
				init1, init2 := fill(20*u+u/2), fill(40*u-3)
				req := fill(tt.n)
				var paths [2]string
				for i := range paths {
					paths[i] = filepath.Join(t.TempDir(), "c.bin")
					c, err := CreateContainer(paths[i], dek, CreateOptions{Kind: KindExtent, Binding: keys.Binding{Purpose: keys.PurposeDisk, OwnerID: "disk-1"}, UnitSize: unit, FileID: &id})
					if err != nil {
						t.Fatal(err)
					}
					if tt.initial {
						// Data, a hole of whole units, data up to an unaligned EOF.
						if _, err := c.WriteAt(init1, 0); err != nil {
							t.Fatal(err)
						}
						if _, err := c.WriteAt(init2, 31*u); err != nil {
							t.Fatal(err)
						}
					}
					p := bytes.Clone(req)
					var n int
					if i == 0 {
						n, err = c.WriteAt(p, tt.off)
						if !bytes.Equal(p, req) {
							t.Fatal("WriteAt modified its argument")
						}
					} else {
						n, err = c.WriteAtInPlace(p, tt.off)
					}
					if err != nil || n != len(req) {
						t.Fatalf("write %d: n=%d err=%v", i, n, err)
					}
					var m model
					if tt.initial {
						m.write(init1, 0)
						m.write(init2, 31*u)
					}
					m.write(req, tt.off)
					checkContents(t, c, m)
					if err := c.Close(); err != nil {
						t.Fatal(err)
					}
				}
				a, _ := os.ReadFile(paths[0])
				b, _ := os.ReadFile(paths[1])
				if !bytes.Equal(a, b) {
					i := 0
					for i < min(len(a), len(b)) && a[i] == b[i] {
						i++
					}
					t.Fatalf("backing files differ at byte %d (sizes %d, %d)", i, len(a), len(b))
				}
			})
		}
	}
}

// A crash between a shrink's header update and its cut leaves old units
// past the new size; growing the file again must read zeros there, not
// the old data (a writable open cuts what the header does not cover).
func TestContainerShrinkCrashNoStaleData(t *testing.T) {
	dek := testkit.MustDEK(t)
	c, path := newTestContainer(t, dek, 4096)
	c.WriteAt(bytes.Repeat([]byte("old!"), 3*1024), 0)
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	full, _ := os.ReadFile(path)
	c, err := OpenContainer(path, dek, false, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Truncate(4096); err != nil {
		t.Fatal(err)
	}
	c.Close()
	// As if the cut never happened: the old units are back on disk.
	cut, _ := os.ReadFile(path)
	os.WriteFile(path, append(cut, full[len(cut):]...), 0o600)
	c, err = OpenContainer(path, dek, false, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Truncate(3 * 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*4096)
	if _, err := c.ReadAt(got, 4096); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatal("growing after an uncut shrink brought old data back")
	}
}

// TestVerifyHeaderCutInsideHeader: a region that holds slot 0 whole but
// stops inside slot 1 (a file cut within its header) is judged on slot 0
// alone, reported as one damaged slot, and never read past its end.
func TestVerifyHeaderCutInsideHeader(t *testing.T) {
	dek := testkit.MustDEK(t)
	p := filepath.Join(t.TempDir(), "c")
	c, err := CreateContainer(p, dek, CreateOptions{Kind: KindNVRAM, Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: "vm-1"}})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	head, err := ReadHead(p)
	if err != nil {
		t.Fatal(err)
	}
	ck, err := DeriveContainerKeys(dek)
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Destroy()
	for _, n := range []int{SlotSize, SlotSize + 100, 2*SlotSize - 1} {
		h, health, err := VerifyHeader(head[:n], ck)
		if err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if h.Kind != KindNVRAM || health.Degraded == "" {
			t.Fatalf("%d bytes: kind %v, health %+v; want slot 0, degraded", n, h.Kind, health)
		}
	}
	if _, _, err := VerifyHeader(head[:SlotSize-1], ck); err == nil {
		t.Fatal("a region shorter than one slot verified")
	}
}

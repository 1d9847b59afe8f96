package xts

import (
	"bytes"
	"testing"
)

// FuzzImplsAgree runs arbitrary data, unit sizes and 128-bit unit numbers
// through every available implementation and requires identical results to
// the generic one (and to the independent reference), plus a round trip and
// in-place equivalence.
func FuzzImplsAgree(f *testing.F) {
	f.Add(make([]byte, 64), make([]byte, 512), uint16(31), uint64(0), uint64(0), false)
	f.Add([]byte("key"), bytes.Repeat([]byte{0xa5}, 4096+33), uint16(255), ^uint64(0), uint64(0), true)
	f.Add([]byte{1, 2, 3}, make([]byte, 17), uint16(0), uint64(1<<32-1), uint64(7), false)
	f.Fuzz(func(t *testing.T, keyIn, data []byte, unitBlocks uint16, lo, hi uint64, inPlace bool) {
		key := make([]byte, 64)
		copy(key, keyIn)
		if bytes.Equal(key[:32], key[32:]) {
			key[0] ^= 1
		}
		unit := 16 * (1 + int(unitBlocks)%4096) // 16 B .. 64 KiB
		if len(data) > 1<<18 {
			data = data[:1<<18]
		}
		if r := len(data) % unit; r != 0 && r < 16 {
			data = data[:len(data)-r]
		}
		if len(data) < 16 {
			return
		}
		g, err := New(key, unit, ImplGeneric)
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		want := make([]byte, len(data))
		if err := g.crypt(want, data, lo, hi, true); err != nil {
			t.Fatal(err)
		}
		if len(data) <= 4096 {
			if ref := refCrypt(key, unit, data, lo, hi, true); !bytes.Equal(ref, want) {
				t.Fatalf("generic differs from reference (unit %d, len %d)", unit, len(data))
			}
		}
		for _, impl := range Available() {
			c, err := New(key, unit, impl)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			src := data
			if inPlace {
				copy(got, data)
				src = got
			}
			if err := c.crypt(got, src, lo, hi, true); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s: encrypt differs from generic (unit %d, len %d, first %#x:%#x)", impl, unit, len(data), hi, lo)
			}
			if err := c.crypt(got, got, lo, hi, false); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("%s: decrypt does not round-trip (unit %d, len %d)", impl, unit, len(data))
			}
			c.Close()
		}
	})
}

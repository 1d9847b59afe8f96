package xts

import (
	"bytes"
	"crypto/aes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	xxts "golang.org/x/crypto/xts"
)

// ---------------------------------------------------------------------------
// An independent reference: IEEE 1619 §5.3/5.4 written out as directly as
// possible, byte-wise, with crypto/aes, allocating freely. It shares no code
// with the package (not even the GF doubling).

// refDouble multiplies the tweak by alpha exactly as the standard's
// byte-oriented pseudo-code does (§5.2).
func refDouble(t *[16]byte) {
	var cin byte
	for j := 0; j < 16; j++ {
		cout := t[j] >> 7
		t[j] = t[j]<<1 | cin
		cin = cout
	}
	if cin != 0 {
		t[0] ^= 0x87
	}
}

// refUnit encrypts or decrypts one data unit (len >= 16) with a 128-bit
// tweak value i (little endian).
func refUnit(key []byte, i [16]byte, in []byte, enc bool) []byte {
	k1, _ := aes.NewCipher(key[:32])
	k2, _ := aes.NewCipher(key[32:])
	var t [16]byte
	k2.Encrypt(t[:], i[:])
	block := func(dst, src []byte, tw [16]byte) {
		var x [16]byte
		for j := range x {
			x[j] = src[j] ^ tw[j]
		}
		if enc {
			k1.Encrypt(x[:], x[:])
		} else {
			k1.Decrypt(x[:], x[:])
		}
		for j := range x {
			dst[j] = x[j] ^ tw[j]
		}
	}
	out := make([]byte, len(in))
	m, r := len(in)/16, len(in)%16
	tweaks := make([][16]byte, m+1)
	for j := 0; j <= m; j++ {
		tweaks[j] = t
		refDouble(&t)
	}
	if r == 0 {
		for j := 0; j < m; j++ {
			block(out[16*j:], in[16*j:], tweaks[j])
		}
		return out
	}
	for j := 0; j < m-1; j++ {
		block(out[16*j:], in[16*j:], tweaks[j])
	}
	last := in[16*(m-1):]
	cc := make([]byte, 16)
	pp := make([]byte, 16)
	if enc {
		block(cc, last, tweaks[m-1])
		copy(pp, last[16:])
		copy(pp[r:], cc[r:])
		block(out[16*(m-1):], pp, tweaks[m])
		copy(out[16*m:], cc[:r])
	} else {
		block(pp, last, tweaks[m])
		copy(cc, last[16:])
		copy(cc[r:], pp[r:])
		block(out[16*(m-1):], cc, tweaks[m-1])
		copy(out[16*m:], pp[:r])
	}
	return out
}

// refCrypt applies refUnit to consecutive units starting at unit number
// hi:lo (128-bit arithmetic).
func refCrypt(key []byte, unit int, in []byte, lo, hi uint64, enc bool) []byte {
	var out []byte
	for off := 0; off < len(in); off += unit {
		var i [16]byte
		binary.LittleEndian.PutUint64(i[:], lo)
		binary.LittleEndian.PutUint64(i[8:], hi)
		out = append(out, refUnit(key, i, in[off:min(off+unit, len(in))], enc)...)
		lo++
		if lo == 0 {
			hi++
		}
	}
	return out
}

// ---------------------------------------------------------------------------

func randKey(r *rand.Rand) []byte {
	k := make([]byte, 64)
	for i := range k {
		k[i] = byte(r.Uint32())
	}
	return k
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func newT(t testing.TB, key []byte, unit int, impl Impl) *Cipher {
	t.Helper()
	c, err := New(key, unit, impl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// at returns a buffer of n bytes at byte offset off inside a larger
// allocation (so kernels see unaligned pointers), followed by guard bytes
// that guardsIntact checks.
func at(n, off int) []byte {
	full := bytes.Repeat([]byte{0xee}, n+off+64)
	clear(full[off : off+n])
	return full[off : off+n]
}

// guardsIntact reports whether the 64 guard bytes after a buffer from at
// are untouched.
func guardsIntact(b []byte) bool {
	return bytes.Equal(b[len(b):len(b)+64], bytes.Repeat([]byte{0xee}, 64))
}

func TestRefDoubleMatchesMulX(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 1000; i++ {
		var b [16]byte
		copy(b[:], randBytes(r, 16))
		lo, hi := binary.LittleEndian.Uint64(b[:]), binary.LittleEndian.Uint64(b[8:])
		n := r.IntN(300)
		plo, phi := mulXPow(lo, hi, n)
		for j := 0; j < n; j++ {
			refDouble(&b)
			lo, hi = mulX(lo, hi)
		}
		if lo != plo || hi != phi || binary.LittleEndian.Uint64(b[:]) != lo || binary.LittleEndian.Uint64(b[8:]) != hi {
			t.Fatalf("GF doubling mismatch after %d steps", n)
		}
	}
}

// TestKeySchedule checks our FIPS-197 expansion (encryption and equivalent
// inverse keys) against crypto/aes, through the kernels: the ECB tweak
// kernel is AES-256 encryption under K2, and an XTS kernel with an all-zero
// tweak (0*x = 0) is plain ECB under K1, in both directions. Block counts
// 1..70 walk every tail path of every kernel.
func TestKeySchedule(t *testing.T) {
	// FIPS-197 Appendix C.3 first, on the pure-Go schedule.
	var ek [scheduleSz]byte
	expandKey256(ek[:], mustHex(t, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"))
	// Appendix A.3: the last word w[59] of key 603deb10...; C.3's key gives
	// round key 14 = 24fc79ccbf0979e9371ac23c6d68de36.
	if got := fmt.Sprintf("%x", ek[224:240]); got != "24fc79ccbf0979e9371ac23c6d68de36" {
		t.Fatalf("FIPS-197 C.3 round key 14 = %s", got)
	}
	expandKey256(ek[:], mustHex(t, "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"))
	if got := fmt.Sprintf("%x", ek[236:240]); got != "706c631e" {
		t.Fatalf("FIPS-197 A.3 w[59] = %s", got)
	}

	r := rand.New(rand.NewPCG(3, 4))
	for _, impl := range Available() {
		if impl == ImplGeneric {
			continue
		}
		t.Run(string(impl), func(t *testing.T) {
			for trial := 0; trial < 20; trial++ {
				key := randKey(r)
				c := newT(t, key, 4096, impl)
				a1, _ := aes.NewCipher(key[:32])
				a2, _ := aes.NewCipher(key[32:])
				for n := 1; n <= 70; n++ {
					src := randBytes(r, 16*n)
					want := make([]byte, len(src))
					for i := 0; i < n; i++ {
						a2.Encrypt(want[16*i:], src[16*i:])
					}
					// Guard bytes after the blocks catch kernels that store
					// past the end (e.g. a wrong tail mask).
					guarded := append(append([]byte(nil), src...), bytes.Repeat([]byte{0xee}, 64)...)
					got := guarded[:len(src)]
					c.ecbTweaks(&got[0], n)
					if !bytes.Equal(got, want) {
						t.Fatalf("ECB(K2) of %d blocks differs from crypto/aes", n)
					}
					if !bytes.Equal(guarded[len(src):], bytes.Repeat([]byte{0xee}, 64)) {
						t.Fatalf("ECB(K2) of %d blocks wrote past the end", n)
					}
					var zero [16]byte
					for _, enc := range []bool{true, false} {
						for i := 0; i < n; i++ {
							if enc {
								a1.Encrypt(want[16*i:], src[16*i:])
							} else {
								a1.Decrypt(want[16*i:], src[16*i:])
							}
						}
						guarded := bytes.Repeat([]byte{0xee}, len(src)+64)
						got := guarded[:len(src)]
						c.xtsExplicit(enc, &got[0], &src[0], &zero[0], 1, len(src))
						if !bytes.Equal(got, want) {
							t.Fatalf("zero-tweak XTS (enc=%v) of %d blocks differs from crypto/aes ECB", enc, n)
						}
						if !bytes.Equal(guarded[len(src):], bytes.Repeat([]byte{0xee}, 64)) {
							t.Fatalf("XTS kernel (enc=%v) of %d blocks wrote past the end", enc, n)
						}
					}
				}
			}
		})
	}
}

var unitSizes = []int{16, 32, 512, 4096, 65536}

// TestImplsAgree compares every implementation with the independent
// reference on random keys, lengths (including ragged tails), buffer
// offsets, in-place and out-of-place operation, and unit numbers around
// 2^32 and 2^64 (crossing into the upper 64 bits inside one call).
func TestImplsAgree(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	trials := 300
	if testing.Short() {
		trials = 60
	}
	for _, impl := range Available() {
		t.Run(string(impl), func(t *testing.T) {
			for trial := 0; trial < trials; trial++ {
				unit := unitSizes[trial%len(unitSizes)]
				if trial%3 == 2 {
					unit = 16 * (1 + r.IntN(700)) // random multiple of 16
				}
				key := randKey(r)
				c := newT(t, key, unit, impl)
				// Up to a few units plus a random tail (>= 16 if non-empty).
				units := r.IntN(4)
				if unit <= 512 {
					units = r.IntN(80) // many units per kernel call
				}
				tail := 0
				if r.IntN(2) == 0 {
					tail = 16 + r.IntN(unit-15) // 16..unit
					if tail == unit {
						tail = 0
					}
				}
				n := units*unit + tail
				if n < 16 {
					n = 16
				}
				var lo, hi uint64
				switch r.IntN(4) {
				case 0:
					lo = uint64(r.IntN(1000))
				case 1:
					lo = 1<<32 - uint64(r.IntN(50))
				case 2:
					lo = -uint64(1 + r.IntN(50)) // just below 2^64: crosses it
				case 3:
					lo, hi = r.Uint64(), r.Uint64()
				}
				checkAgainstRef(t, c, key, n, lo, hi, r)
			}
		})
	}
}

func checkAgainstRef(t *testing.T, c *Cipher, key []byte, n int, lo, hi uint64, r *rand.Rand) {
	t.Helper()
	pt := at(n, r.IntN(64))
	copy(pt, randBytes(r, n))
	want := refCrypt(key, c.unitSize, pt, lo, hi, true)
	desc := fmt.Sprintf("%s unit %d len %d first %#x:%#x", c.impl, c.unitSize, n, hi, lo)

	ct := at(n, r.IntN(64))
	if err := c.crypt(ct, pt, lo, hi, true); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ct, want) {
		t.Fatalf("%s: encrypt differs from reference at byte %d", desc, firstDiff(ct, want))
	}
	back := at(n, r.IntN(64))
	if err := c.crypt(back, ct, lo, hi, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, pt) {
		t.Fatalf("%s: decrypt does not round-trip (byte %d)", desc, firstDiff(back, pt))
	}
	// In place, both directions.
	buf := at(n, r.IntN(64))
	copy(buf, pt)
	if err := c.crypt(buf, buf, lo, hi, true); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, want) {
		t.Fatalf("%s: in-place encrypt differs at byte %d", desc, firstDiff(buf, want))
	}
	if err := c.crypt(buf, buf, lo, hi, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, pt) {
		t.Fatalf("%s: in-place decrypt differs at byte %d", desc, firstDiff(buf, pt))
	}
	for _, b := range [][]byte{pt, ct, back, buf} {
		if !guardsIntact(b) {
			t.Fatalf("%s: wrote past the end of a buffer", desc)
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestAgainstXCrypto cross-checks full-block units with golang.org/x/crypto/xts
// (which has no ciphertext stealing) through the public API, including a run
// that crosses unit number 2^32.
func TestAgainstXCrypto(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for _, impl := range Available() {
		for _, unit := range []int{16, 32, 512, 4096, 65536, 16 * 37} {
			key := randKey(r)
			c := newT(t, key, unit, impl)
			x, err := xxts.NewCipher(aes.NewCipher, key)
			if err != nil {
				t.Fatal(err)
			}
			units := max(1, 200000/unit)
			pt := randBytes(r, units*unit)
			first := uint64(1<<32 - units/2)
			got := make([]byte, len(pt))
			if err := c.Encrypt(got, pt, first); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, len(pt))
			for u := 0; u < units; u++ {
				x.Encrypt(want[u*unit:(u+1)*unit], pt[u*unit:(u+1)*unit], first+uint64(u))
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s unit %d: differs from x/crypto/xts at byte %d", impl, unit, firstDiff(got, want))
			}
			if err := c.Decrypt(got, got, first); err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("%s unit %d: decrypt: %v", impl, unit, err)
			}
		}
	}
}

// TestUnitNumberWraps checks the 128-bit unit counter through the public
// API: after unit 2^64-1 comes tweak value 2^64 (byte 8 = 1), not 0.
func TestUnitNumberWraps(t *testing.T) {
	key := randKey(rand.New(rand.NewPCG(9, 10)))
	for _, impl := range Available() {
		c := newT(t, key, 512, impl)
		pt := make([]byte, 3*512)
		got := make([]byte, len(pt))
		if err := c.Encrypt(got, pt, ^uint64(0)-1); err != nil {
			t.Fatal(err)
		}
		want := refCrypt(key, 512, pt, ^uint64(0)-1, 0, true)
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: wrong across 2^64", impl)
		}
		// The third unit is 2^64: same as encrypting it alone at hi=1, lo=0.
		alone := make([]byte, 512)
		if err := c.crypt(alone, pt[:512], 0, 1, true); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(alone, got[1024:]) {
			t.Fatalf("%s: unit after 2^64-1 is not 2^64", impl)
		}
		// And it differs from unit 0 (no silent 64-bit wrap).
		if err := c.Encrypt(alone, pt[:512], 0); err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(alone, got[1024:]) {
			t.Fatalf("%s: unit number wrapped to 0", impl)
		}
	}
}

// TestRaggedRoundTrip round-trips every length from 16 to 600 bytes through
// every implementation with a few unit sizes, comparing with generic.
func TestRaggedRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	key := randKey(r)
	for _, unit := range []int{16, 48, 512} {
		g := newT(t, key, unit, ImplGeneric)
		for _, impl := range Available() {
			c := newT(t, key, unit, impl)
			for n := 16; n <= 600; n++ {
				if rem := n % unit; rem != 0 && rem < 16 {
					continue
				}
				pt := randBytes(r, n)
				want := make([]byte, n)
				got := make([]byte, n)
				if err := g.Encrypt(want, pt, 77); err != nil {
					t.Fatal(err)
				}
				if err := c.Encrypt(got, pt, 77); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("%s unit %d len %d: differs from generic", impl, unit, n)
				}
				if err := c.Decrypt(got, got, 77); err != nil || !bytes.Equal(got, pt) {
					t.Fatalf("%s unit %d len %d: round trip failed (%v)", impl, unit, n, err)
				}
			}
		}
	}
}

func TestBadInput(t *testing.T) {
	good := randKey(rand.New(rand.NewPCG(13, 14)))
	equal := append(append([]byte(nil), good[:32]...), good[:32]...)
	for _, impl := range Available() {
		for _, tc := range []struct {
			key  []byte
			unit int
			want string
		}{
			{good[:32], 512, "key must be 64 bytes (XTS-AES-256), got 32"},
			{nil, 512, "got 0"},
			{append(good, 0), 512, "got 65"},
			{equal, 512, "key halves are equal"},
			{good, 0, "data unit size"},
			{good, 8, "data unit size"},
			{good, 520, "data unit size"},
			{good, 1<<20 + 16, "data unit size"},
			{good, -16, "data unit size"},
		} {
			c, err := New(tc.key, tc.unit, impl)
			if err == nil {
				c.Close()
				t.Fatalf("%s: New(%d-byte key, %d) succeeded", impl, len(tc.key), tc.unit)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%s: error %q does not mention %q", impl, err, tc.want)
			}
			if strings.Contains(err.Error(), fmt.Sprintf("%x", good[:4])) {
				t.Fatalf("error contains key bytes: %v", err)
			}
		}
		if c, err := New(good, 1<<20, impl); err != nil {
			t.Fatalf("%s: 1 MiB unit rejected: %v", impl, err)
		} else {
			c.Close()
		}

		c := newT(t, good, 512, impl)
		buf := make([]byte, 4096)
		for _, tc := range []struct {
			name     string
			dst, src []byte
			want     string
		}{
			{"empty", nil, nil, "shorter than one 16-byte block"},
			{"short", buf[:15], buf[100:115], "shorter than one 16-byte block"},
			{"mismatch", buf[:512], buf[1024:1040], "lengths differ"},
			{"tiny tail", buf[:520], buf[1024:1544], "final data unit of 8 bytes"},
			{"overlap fwd", buf[16:1040], buf[:1024], "overlap"},
			{"overlap back", buf[:1024], buf[16:1040], "overlap"},
		} {
			for _, f := range []func([]byte, []byte, uint64) error{c.Encrypt, c.Decrypt} {
				err := f(tc.dst, tc.src, 0)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("%s %s: got error %v, want %q", impl, tc.name, err, tc.want)
				}
			}
		}
		// Adjacent but not overlapping is fine, and so is exact aliasing.
		if err := c.Encrypt(buf[:1024], buf[1024:2048], 0); err != nil {
			t.Fatalf("%s: adjacent buffers rejected: %v", impl, err)
		}
		if err := c.Encrypt(buf[:1024], buf[:1024], 0); err != nil {
			t.Fatalf("%s: in-place rejected: %v", impl, err)
		}
	}
	if _, err := New(good, 512, "bogus"); err == nil || !strings.Contains(err.Error(), "unknown implementation") {
		t.Fatalf("bogus impl: %v", err)
	}
}

func TestChoose(t *testing.T) {
	av := Available()
	if len(av) == 0 || av[len(av)-1] != ImplGeneric {
		t.Fatalf("Available() = %v: generic must be last", av)
	}
	for _, name := range []string{"", "auto"} {
		if i, err := Choose(name); err != nil || i != av[0] {
			t.Fatalf("Choose(%q) = %v, %v; want %v", name, i, err, av[0])
		}
	}
	for _, i := range []Impl{ImplVAES512, ImplVAES256, ImplAESNI, ImplGeneric} {
		got, err := Choose(string(i))
		if usable(i) != (err == nil) {
			t.Fatalf("Choose(%q): err %v but usable=%v", i, err, usable(i))
		}
		if err == nil && got != i {
			t.Fatalf("Choose(%q) = %q", i, got)
		}
		if err != nil && !strings.Contains(err.Error(), "not available") {
			t.Fatalf("Choose(%q): unclear error %v", i, err)
		}
	}
	if _, err := Choose("VAES512x"); err == nil || !strings.Contains(err.Error(), "unknown implementation") {
		t.Fatalf("Choose(unknown): %v", err)
	}
	t.Logf("available %v, features %v", av, Features())
}

func TestClose(t *testing.T) {
	key := randKey(rand.New(rand.NewPCG(15, 16)))
	for _, impl := range Available() {
		c, err := New(key, 512, impl)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1024)
		if err := c.Encrypt(buf, buf, 0); err != nil {
			t.Fatal(err)
		}
		keys := c.keys
		c.Close()
		c.Close() // idempotent
		if err := c.Encrypt(buf, buf, 0); err == nil || !strings.Contains(err.Error(), "closed") {
			t.Fatalf("%s: Encrypt after Close: %v", impl, err)
		}
		if err := c.Decrypt(buf, buf, 0); err == nil {
			t.Fatalf("%s: Decrypt after Close succeeded", impl)
		}
		if c.keys != nil || c.keyBuf != nil || c.b1 != nil {
			t.Fatalf("%s: key references kept after Close", impl)
		}
		_ = keys // unmapped now: must not be touched
	}
}

// TestZeroAllocs: Encrypt and Decrypt must not allocate, including the
// ragged-tail path.
func TestZeroAllocs(t *testing.T) {
	key := randKey(rand.New(rand.NewPCG(17, 18)))
	for _, impl := range Available() {
		c := newT(t, key, 512, impl)
		for _, n := range []int{512, 4096, 64 * 1024, 100*512 + 300} {
			buf := make([]byte, n)
			out := make([]byte, n)
			if a := testing.AllocsPerRun(50, func() {
				if err := c.Encrypt(out, buf, 1); err != nil {
					t.Fatal(err)
				}
			}); a != 0 {
				t.Fatalf("%s: Encrypt(%d bytes) allocates %.1f times", impl, n, a)
			}
			if a := testing.AllocsPerRun(50, func() {
				if err := c.Decrypt(buf, buf, 1); err != nil {
					t.Fatal(err)
				}
			}); a != 0 {
				t.Fatalf("%s: Decrypt(%d bytes) allocates %.1f times", impl, n, a)
			}
		}
	}
}

// TestConcurrent shares one Cipher between goroutines (run with -race), and
// closes another one while calls are in flight.
func TestConcurrent(t *testing.T) {
	r := rand.New(rand.NewPCG(19, 20))
	key := randKey(r)
	pt := randBytes(r, 64*1024+700)
	for _, impl := range Available() {
		c := newT(t, key, 4096, impl)
		want := make([]byte, len(pt))
		if err := c.Encrypt(want, pt, 5); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				out := make([]byte, len(pt))
				for i := 0; i < 20; i++ {
					if err := c.Encrypt(out, pt, 5); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(out, want) {
						errs <- fmt.Errorf("%s: concurrent result differs", impl)
						return
					}
					if err := c.Decrypt(out, out, 5); err != nil || !bytes.Equal(out, pt) {
						errs <- fmt.Errorf("%s: concurrent decrypt failed: %v", impl, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}

		// Close racing with users: calls either complete or report closure.
		c2, err := New(key, 4096, impl)
		if err != nil {
			t.Fatal(err)
		}
		var wg2 sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg2.Add(1)
			go func() {
				defer wg2.Done()
				out := make([]byte, len(pt))
				for i := 0; i < 50; i++ {
					if err := c2.Encrypt(out, pt, 5); err != nil {
						if !strings.Contains(err.Error(), "closed") {
							t.Error(err)
						}
						return
					}
				}
			}()
		}
		c2.Close()
		wg2.Wait()
	}
}

// TestCleanupWithoutClose drops Ciphers without Close; the cleanup must
// release their key regions without crashing.
func TestCleanupWithoutClose(t *testing.T) {
	key := randKey(rand.New(rand.NewPCG(21, 22)))
	for i := 0; i < 50; i++ {
		for _, impl := range Available() {
			c, err := New(key, 4096, impl)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4096)
			if err := c.Encrypt(buf, buf, 1); err != nil {
				t.Fatal(err)
			}
		}
	}
	runtime.GC()
	runtime.GC()
	// And Close followed by collection must not free twice.
	func() {
		c, err := New(key, 4096, Available()[0])
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}()
	runtime.GC()
	runtime.GC()
}

// TestKeyRegionProtected: the assembly schedules live in one page that the
// kernel marks locked, not dumpable and not inherited by a fork
// (/proc/self/smaps VmFlags lo, dd, dc), the properties internal/secmem
// promises; the generic implementation says it is not locked.
func TestKeyRegionProtected(t *testing.T) {
	key := randKey(rand.New(rand.NewPCG(31, 32)))
	for _, impl := range Available() {
		c, err := New(key, 4096, impl)
		if err != nil {
			t.Fatal(err)
		}
		if impl == ImplGeneric {
			if c.Locked() {
				t.Fatalf("generic: Locked() true for heap schedules")
			}
			c.Close()
			continue
		}
		flags := vmFlags(t, uintptrOf(c.keys))
		for _, want := range []string{"dd", "dc"} {
			if !slices.Contains(flags, want) {
				t.Errorf("%s: key page VmFlags %v lack %q", impl, flags, want)
			}
		}
		if os.Geteuid() == 0 {
			if !c.Locked() || !slices.Contains(flags, "lo") {
				t.Errorf("%s: as root the key page is not locked (Locked %v, VmFlags %v)", impl, c.Locked(), flags)
			}
		}
		c.Close()
		if c.Locked() {
			t.Errorf("%s: Locked() after Close", impl)
		}
	}
}

// vmFlags returns the VmFlags of the mapping holding addr in /proc/self/smaps.
func vmFlags(t *testing.T, addr uintptr) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	in := false
	for _, line := range strings.Split(string(data), "\n") {
		// A mapping's header line starts with "lo-hi " in hex; its
		// attribute lines start with a "Name:" field.
		if f := strings.Fields(line); len(f) > 0 && !strings.HasSuffix(f[0], ":") {
			var lo, hi uintptr
			if _, err := fmt.Sscanf(f[0], "%x-%x", &lo, &hi); err == nil {
				in = addr >= lo && addr < hi
			}
			continue
		}
		if in && strings.HasPrefix(line, "VmFlags:") {
			return strings.Fields(strings.TrimPrefix(line, "VmFlags:"))
		}
	}
	t.Fatalf("mapping of %#x not found in smaps", addr)
	return nil
}

package xts

import "encoding/binary"

// AES-256 key expansion (FIPS-197 §5.2) for the assembly kernels.
//
// We expand keys ourselves instead of borrowing crypto/aes internals so the
// round keys can be written straight into locked, non-dumpable memory (from
// internal/secmem) in exactly the layout the kernels read: 15 round keys of 16
// Bytes, each in the byte order AESENC expects (which is the FIPS-197 byte
// order of the words w[4r..4r+3]).
//
// The S-box is computed, not looked up: a table lookup indexed by key bytes
// leaks the key through the data cache, and key setup is rare enough that
// ~10 µs of arithmetic per key does not matter.

const (
	aesRounds  = 14
	roundKeys  = aesRounds + 1 // 15
	scheduleSz = roundKeys * 16
)

// gmul multiplies in GF(2^8) modulo x^8+x^4+x^3+x+1 without branches or
// table lookups on secret data.
func gmul(a, b byte) byte {
	var r byte
	for i := 0; i < 8; i++ {
		r ^= a & -(b & 1)
		hi := a >> 7
		a = a<<1 ^ (0x1b & -hi)
		b >>= 1
	}
	return r
}

// sbox computes the AES S-box: the multiplicative inverse x^254 (0 maps to
// 0) followed by the affine transform.
func sbox(x byte) byte {
	x2 := gmul(x, x)
	x3 := gmul(x2, x)
	x6 := gmul(x3, x3)
	x12 := gmul(x6, x6)
	x15 := gmul(x12, x3)
	x30 := gmul(x15, x15)
	x60 := gmul(x30, x30)
	x120 := gmul(x60, x60)
	x240 := gmul(x120, x120)
	x252 := gmul(x240, x12)
	inv := gmul(x252, x2)
	rotl := func(b byte, n uint) byte { return b<<n | b>>(8-n) }
	return inv ^ rotl(inv, 1) ^ rotl(inv, 2) ^ rotl(inv, 3) ^ rotl(inv, 4) ^ 0x63
}

func subWord(w uint32) uint32 {
	return uint32(sbox(byte(w>>24)))<<24 | uint32(sbox(byte(w>>16)))<<16 |
		uint32(sbox(byte(w>>8)))<<8 | uint32(sbox(byte(w)))
}

// expandKey256 writes the 15 encryption round keys of the 32-byte key into
// ek (len >= 240).
func expandKey256(ek []byte, key []byte) {
	_ = ek[scheduleSz-1]
	_ = key[31]
	var w [4 * roundKeys]uint32
	for i := 0; i < 8; i++ {
		w[i] = binary.BigEndian.Uint32(key[4*i:])
	}
	rcon := uint32(1)
	for i := 8; i < len(w); i++ {
		t := w[i-1]
		switch i % 8 {
		case 0:
			t = subWord(t<<8|t>>24) ^ rcon<<24
			rcon <<= 1 // never exceeds 0x40 for AES-256, so no reduction needed
		case 4:
			t = subWord(t)
		}
		w[i] = w[i-8] ^ t
	}
	for i, v := range w {
		binary.BigEndian.PutUint32(ek[4*i:], v)
	}
	wipeWords(w[:])
}

// wipeWords zeroes a temporary copy of key material. It is not inlined so
// the compiler cannot treat the stores as dead and drop them.
//
//go:noinline
func wipeWords(w []uint32) { clear(w) }

// invMixColumns applies InvMixColumns to one 16-byte round key in place.
func invMixColumns(b []byte) {
	for c := 0; c < 4; c++ {
		a0, a1, a2, a3 := b[4*c], b[4*c+1], b[4*c+2], b[4*c+3]
		b[4*c] = gmul(a0, 14) ^ gmul(a1, 11) ^ gmul(a2, 13) ^ gmul(a3, 9)
		b[4*c+1] = gmul(a0, 9) ^ gmul(a1, 14) ^ gmul(a2, 11) ^ gmul(a3, 13)
		b[4*c+2] = gmul(a0, 13) ^ gmul(a1, 9) ^ gmul(a2, 14) ^ gmul(a3, 11)
		b[4*c+3] = gmul(a0, 11) ^ gmul(a1, 13) ^ gmul(a2, 9) ^ gmul(a3, 14)
	}
}

// decryptionKeys derives the round keys of FIPS-197's equivalent inverse
// cipher (§5.3.5), which is what AESDEC/AESDECLAST implement: the
// encryption keys in reverse order, with InvMixColumns applied to all but
// the first and last (what AESIMC would compute).
func decryptionKeys(dk, ek []byte) {
	_ = dk[scheduleSz-1]
	_ = ek[scheduleSz-1]
	for r := 0; r < roundKeys; r++ {
		copy(dk[16*r:16*r+16], ek[16*(aesRounds-r):16*(aesRounds-r)+16])
		if r != 0 && r != aesRounds {
			invMixColumns(dk[16*r : 16*r+16])
		}
	}
}

// broadcast256 stores each 16-byte round key twice in a row (32 bytes per
// key), the layout the YMM kernel uses as VAESENC m256 memory operands.
func broadcast256(dst, rk []byte) {
	_ = dst[2*scheduleSz-1]
	for r := 0; r < roundKeys; r++ {
		copy(dst[32*r:], rk[16*r:16*r+16])
		copy(dst[32*r+16:], rk[16*r:16*r+16])
	}
}

package xts

import (
	"crypto/cipher"
	"encoding/binary"
)

// The generic implementation: one crypto/aes call per 16-byte block, with
// the XTS tweak logic written out plainly. It is the reference the assembly
// kernels are tested against, and the fallback on CPUs without AES-NI.
//
// It never passes a stack buffer to cipher.Block (an interface call, so the
// buffer would escape to the heap and cost an allocation per call): blocks
// are processed in place in dst, and values are carried in uint64 words.

func (c *Cipher) cryptGeneric(dst, src []byte, lo, hi uint64, enc bool) {
	us := c.unitSize
	for off := 0; off < len(src); off += us {
		end := min(off+us, len(src))
		c.unitGeneric(dst[off:end], src[off:end], lo, hi, enc)
		lo++
		if lo == 0 {
			hi++
		}
	}
}

// xorBlock computes d = E(in ^ t) ^ t (or with D), in place in d.
func xorBlock(b cipher.Block, enc bool, d []byte, in0, in1, t0, t1 uint64) {
	d = d[:blockSize]
	binary.LittleEndian.PutUint64(d[0:], in0^t0)
	binary.LittleEndian.PutUint64(d[8:], in1^t1)
	if enc {
		b.Encrypt(d, d)
	} else {
		b.Decrypt(d, d)
	}
	binary.LittleEndian.PutUint64(d[0:], binary.LittleEndian.Uint64(d[0:])^t0)
	binary.LittleEndian.PutUint64(d[8:], binary.LittleEndian.Uint64(d[8:])^t1)
}

func words(b []byte) (uint64, uint64) {
	return binary.LittleEndian.Uint64(b[0:]), binary.LittleEndian.Uint64(b[8:])
}

// unitGeneric processes one data unit (len >= 16) numbered hi:lo.
func (c *Cipher) unitGeneric(dst, src []byte, lo, hi uint64, enc bool) {
	// Save the first input block: dst[:16] (which may be src[:16]) serves as
	// scratch space to encrypt the tweak.
	s0, s1 := words(src)
	binary.LittleEndian.PutUint64(dst[0:], lo)
	binary.LittleEndian.PutUint64(dst[8:], hi)
	c.b2.Encrypt(dst[:blockSize], dst[:blockSize])
	t0, t1 := words(dst)

	m, r := len(src)/blockSize, len(src)%blockSize
	full := m
	if r != 0 {
		full = m - 1 // the last full block takes part in ciphertext stealing
	}
	in := func(i int) (uint64, uint64) {
		if i == 0 {
			return s0, s1
		}
		return words(src[blockSize*i:])
	}
	b := c.b1
	for i := 0; i < full; i++ {
		a0, a1 := in(i)
		xorBlock(b, enc, dst[blockSize*i:], a0, a1, t0, t1)
		t0, t1 = mulX(t0, t1)
	}
	if r == 0 {
		return
	}

	// Ciphertext stealing (IEEE 1619 §5.3.2 and §5.4.2). (t0, t1) is the tweak
	// of block m-1; block m, the partial one, has tweak (n0, n1).
	n0, n1 := mulX(t0, t1)
	p := blockSize * (m - 1)
	d := dst[p:]
	a0, a1 := in(m - 1)
	var keep [blockSize]byte
	copy(keep[:r], src[p+blockSize:]) // the partial input block, read before dst is written
	if enc {
		xorBlock(b, true, d, a0, a1, t0, t1) // CC, in d[:16]
		copy(d[blockSize:], d[:r])           // C[m] = CC[:r]
		copy(d[:r], keep[:r])                // d[:16] = P[m] || CC[r:]
		a0, a1 = words(d)
		xorBlock(b, true, d, a0, a1, n0, n1) // C[m-1]
	} else {
		xorBlock(b, false, d, a0, a1, n0, n1) // PP, in d[:16]
		copy(d[blockSize:], d[:r])            // P[m] = PP[:r]
		copy(d[:r], keep[:r])                 // d[:16] = C[m] || PP[r:]
		a0, a1 = words(d)
		xorBlock(b, false, d, a0, a1, t0, t1) // P[m-1]
	}
	clear(keep[:])
}

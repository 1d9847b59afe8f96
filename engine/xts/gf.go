package xts

// GF(2^128) arithmetic on XTS tweaks, IEEE 1619 convention: the 16 tweak
// Bytes are a 128-bit little-endian integer (lo = bytes 0..7, hi = bytes
// 8..15), the field polynomial is x^128 + x^7 + x^2 + x + 1, so multiplying
// by x is a 1-bit left shift with the carry out of bit 127 folded back in as
// 0x87. The assembly kernels use the same identity on vector lanes (see
// internal/asmgen).

// mulX returns t*x ("doubling" the tweak, alpha in IEEE 1619 notation).
func mulX(lo, hi uint64) (uint64, uint64) {
	carry := hi >> 63
	hi = hi<<1 | lo>>63
	lo = lo<<1 ^ (0x87 & -carry)
	return lo, hi
}

// mulXk returns t*x^k for 1 <= k <= 56. The k bits shifted out of the top,
// carry-less multiplied by 0x87 (= x^7+x^2+x+1), fit in k+7 <= 63 bits, so a
// single fold into the low word completes the reduction.
func mulXk(lo, hi uint64, k uint) (uint64, uint64) {
	top := hi >> (64 - k)
	hi = hi<<k | lo>>(64-k)
	lo = lo<<k ^ top ^ top<<1 ^ top<<2 ^ top<<7
	return lo, hi
}

// mulXPow returns t*x^n for any n >= 0, in steps of up to 56 bits so that a
// ciphertext-stealing tail deep inside a 1 MiB unit costs ~1200 steps rather
// than 65535 doublings.
func mulXPow(lo, hi uint64, n int) (uint64, uint64) {
	for n > 0 {
		k := min(n, 56)
		lo, hi = mulXk(lo, hi, uint(k))
		n -= k
	}
	return lo, hi
}

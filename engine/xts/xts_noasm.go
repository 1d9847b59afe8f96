//go:build !amd64 || purego

package xts

// Without assembly kernels only ImplGeneric is available, so these are never
// reached; they exist so the shared driver code compiles.

const asmSupported = false

func (c *Cipher) ecbTweaks(tw *byte, n int) {
	panic("xts: no assembly kernels in this build")
}

func (c *Cipher) xtsUnits(enc bool, dst, src *byte, lo, hi uint64, n, ulen int) {
	panic("xts: no assembly kernels in this build")
}

func (c *Cipher) xtsExplicit(enc bool, dst, src, tw *byte, n, ulen int) {
	panic("xts: no assembly kernels in this build")
}

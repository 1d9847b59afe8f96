//go:build amd64 && !purego

package xts

// asmSupported reports whether this build contains the assembly kernels.
const asmSupported = true

// ecbTweaks encrypts n 16-byte blocks at tw in place with K2.
func (c *Cipher) ecbTweaks(tw *byte, n int) {
	switch c.impl {
	case ImplVAES512:
		ecbEncVAES512(&c.keys[offEK2], tw, tw, n)
	case ImplVAES256:
		ecbEncVAES256(&c.keys[offEK2B], tw, tw, n)
	default:
		ecbEncAESNI(&c.keys[offEK2], tw, tw, n)
	}
}

// xtsUnits runs the XTS kernel over n consecutive units of ulen bytes (a
// multiple of 16) numbered from hi:lo; the kernel encrypts the unit numbers
// with K2 itself.
func (c *Cipher) xtsUnits(enc bool, dst, src *byte, lo, hi uint64, n, ulen int) {
	c.kernel(enc, dst, src, &c.keys[offEK2], nil, lo, hi, n, ulen)
}

// xtsExplicit runs the XTS kernel over n units of ulen bytes whose
// already-encrypted tweaks are at tw (16 bytes per unit).
func (c *Cipher) xtsExplicit(enc bool, dst, src, tw *byte, n, ulen int) {
	c.kernel(enc, dst, src, nil, tw, 0, 0, n, ulen)
}

// kernel dispatches to the assembly. The kernels are called directly, not
// through function values: the compiler then sees their //go:noescape stubs
// and keeps stack buffers passed to them on the stack, which is what makes
// Encrypt/Decrypt allocation-free.
func (c *Cipher) kernel(enc bool, dst, src, tk, tw *byte, lo, hi uint64, n, ulen int) {
	switch c.impl {
	case ImplVAES512:
		if enc {
			xtsEncVAES512(&c.keys[offEK1], tk, dst, src, tw, lo, hi, n, ulen)
		} else {
			xtsDecVAES512(&c.keys[offDK1], tk, dst, src, tw, lo, hi, n, ulen)
		}
	case ImplVAES256:
		if enc {
			xtsEncVAES256(&c.keys[offEK1B], tk, dst, src, tw, lo, hi, n, ulen)
		} else {
			xtsDecVAES256(&c.keys[offDK1B], tk, dst, src, tw, lo, hi, n, ulen)
		}
	default:
		if enc {
			xtsEncAESNI(&c.keys[offEK1], tk, dst, src, tw, lo, hi, n, ulen)
		} else {
			xtsDecAESNI(&c.keys[offDK1], tk, dst, src, tw, lo, hi, n, ulen)
		}
	}
}

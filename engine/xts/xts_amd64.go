//go:build amd64 && !purego

package xts

// asmSupported reports whether this build contains the assembly kernels.
const asmSupported = true

// ecbTweaks encrypts n 16-byte unit numbers at tw in place with K2.
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
// multiple of 16) whose encrypted tweaks are at tw.
//
// The kernels are called directly, not through function values: the
// compiler then sees their //go:noescape stubs and keeps the tweak buffer on
// the stack, which is what makes Encrypt/Decrypt allocation-free.
func (c *Cipher) xtsUnits(enc bool, dst, src, tw *byte, n, ulen int) {
	switch c.impl {
	case ImplVAES512:
		if enc {
			xtsEncVAES512(&c.keys[offEK1], dst, src, tw, n, ulen)
		} else {
			xtsDecVAES512(&c.keys[offDK1], dst, src, tw, n, ulen)
		}
	case ImplVAES256:
		if enc {
			xtsEncVAES256(&c.keys[offEK1B], dst, src, tw, n, ulen)
		} else {
			xtsDecVAES256(&c.keys[offDK1B], dst, src, tw, n, ulen)
		}
	default:
		if enc {
			xtsEncAESNI(&c.keys[offEK1], dst, src, tw, n, ulen)
		} else {
			xtsDecAESNI(&c.keys[offDK1], dst, src, tw, n, ulen)
		}
	}
}

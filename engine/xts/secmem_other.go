//go:build !linux

package xts

// On systems other than Linux (not a deployment target: the daemon needs
// FUSE and dm-crypt compatibility) the schedules fall back to the Go heap.
// They are still zeroed on Close; they are not locked or hidden from dumps.

func allocSecret(n int) ([]byte, error) {
	// Over-allocate so the region can start 64-byte aligned: the legacy-SSE
	// kernel uses 16-byte aligned memory operands.
	buf := make([]byte, n+64)
	off := 0
	for uintptrOf(buf[off:])%64 != 0 {
		off++
	}
	return buf[off : off+n : off+n], nil
}

func freeSecret(b []byte) { clear(b) }

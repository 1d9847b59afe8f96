package xts

import (
	"fmt"
	"runtime"
	"testing"
)

// Benchmarks for `vmcryptd bench` and for comparing with
// `openssl speed -evp aes-256-xts -bytes N` (which, like
// BenchmarkEncrypt/<impl>/<N>, processes one N-byte data unit per call, in
// place, on one core). The Bulk variants process 1 MiB per call, as a FUSE
// write of many units would.

var benchUnits = []int{512, 4096, 65536}

func benchCrypt(b *testing.B, enc bool, bulk bool) {
	key := make([]byte, 64)
	for i := range key {
		key[i] = byte(i*7 + 1)
	}
	for _, impl := range Available() {
		for _, unit := range benchUnits {
			b.Run(fmt.Sprintf("%s/%d", impl, unit), func(b *testing.B) {
				c, err := New(key, unit, impl)
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				n := unit
				if bulk {
					n = 1 << 20
				}
				buf := make([]byte, n)
				f := c.Encrypt
				if !enc {
					f = c.Decrypt
				}
				b.SetBytes(int64(n))
				// Besides wall-clock MB/s, report throughput per second of
				// this thread's CPU time: on a shared, busy machine that is
				// far less noisy, and it is what `openssl speed` divides by
				// by default (user CPU time, unless -elapsed is given).
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				cpu0 := threadCPUTime()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if err := f(buf, buf, uint64(i)); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				if d := threadCPUTime() - cpu0; d > 0 {
					b.ReportMetric(float64(n)*float64(b.N)/d.Seconds()/1e9, "cpuGB/s")
				}
			})
		}
	}
}

func BenchmarkEncrypt(b *testing.B)     { benchCrypt(b, true, false) }
func BenchmarkDecrypt(b *testing.B)     { benchCrypt(b, false, false) }
func BenchmarkEncryptBulk(b *testing.B) { benchCrypt(b, true, true) }
func BenchmarkDecryptBulk(b *testing.B) { benchCrypt(b, false, true) }

package bench

import (
	"fmt"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/xts"
)

// BenchmarkSector measures one data unit per call for every implementation
// this CPU offers, as `vmcryptd bench` does. Compare with
// `openssl speed -evp aes-256-xts -bytes N` run on the same machine.
func BenchmarkSector(b *testing.B) {
	key := make([]byte, 64)
	for i := range key {
		key[i] = byte(i) // distinct halves; content is irrelevant to speed
	}
	for _, impl := range xts.Available() {
		for _, unit := range []int{512, 4096} {
			c, err := xts.New(key, unit, impl)
			if err != nil {
				b.Fatal(err)
			}
			for _, op := range opNames {
				fn := c.Encrypt
				if op == "decrypt" {
					fn = c.Decrypt
				}
				b.Run(fmt.Sprintf("%s/%s/%d", impl, op, unit), func(b *testing.B) {
					buf := make([]byte, unit)
					b.SetBytes(int64(unit))
					b.ReportAllocs()
					for i := 0; b.Loop(); i++ {
						if err := fn(buf, buf, uint64(i)); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
			c.Close()
		}
	}
}

// BenchmarkSectorBatch measures 1 MiB calls, the size the FUSE layer hands
// over, so per-call overhead is amortised over 256 (4 KiB) units.
func BenchmarkSectorBatch(b *testing.B) {
	key := make([]byte, 64)
	for i := range key {
		key[i] = byte(i)
	}
	impl, err := xts.Choose("")
	if err != nil {
		b.Fatal(err)
	}
	c, err := xts.New(key, 4096, impl)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if err := c.Encrypt(buf, buf, 0); err != nil {
			b.Fatal(err)
		}
	}
}

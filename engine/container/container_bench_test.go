package container

import (
	"path/filepath"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/keys"
)

// Per-request cost of the Container alone (no FUSE) for the request
// shapes the view sees most: 4 KiB and 1 MiB, unit-aligned.
func BenchmarkContainerIO(b *testing.B) {
	dek, err := keys.NewDEK()
	if err != nil {
		b.Fatal(err)
	}
	defer dek.Destroy()
	c, err := CreateContainer(filepath.Join(b.TempDir(), "c.bin"), dek, CreateOptions{Kind: KindExtent, Binding: keys.Binding{Purpose: keys.PurposeDisk, OwnerID: "disk-1"}})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	const size = 64 << 20
	if _, err := c.WriteAt(make([]byte, 1<<20), size-1<<20); err != nil {
		b.Fatal(err)
	}
	for _, n := range []int{4 << 10, 1 << 20} {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(i)
		}
		offs := size / int64(n)
		b.Run("ReadAt/"+sizeName(n), func(b *testing.B) {
			b.SetBytes(int64(n))
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if _, err := c.ReadAt(p, int64(i)%offs*int64(n)); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("WriteAt/"+sizeName(n), func(b *testing.B) {
			b.SetBytes(int64(n))
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if _, err := c.WriteAt(p, int64(i)%offs*int64(n)); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("WriteAtInPlace/"+sizeName(n), func(b *testing.B) {
			b.SetBytes(int64(n))
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if _, err := c.WriteAtInPlace(p, int64(i)%offs*int64(n)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func sizeName(n int) string {
	if n >= 1<<20 {
		return "1M"
	}
	return "4k"
}

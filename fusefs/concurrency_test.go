package fusefs

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Concurrency check through the mount. The file is cut into regions of
// regionSize bytes, which is not a multiple of the 4 KiB data unit, so
// neighbouring regions share units and every partial-unit write is a
// read-modify-write racing with writes to the same unit. Each region has
// one writer (which therefore knows its exact content); readers read
// ranges across regions while writes go on.
//
// Every 16-byte chunk carries (region, version, chunk index, check). Units
// are multiples of 16 bytes, so even a torn read sees whole chunks, and a
// lost update, a stale unit written back, or data at the wrong offset
// shows up as a chunk that names the wrong region or index or fails its
// check.
const (
	regionSize  = 5008 // 313 chunks
	chunk       = 16
	regions     = 400 // about 2 MB
	concWriters = 4
	concReaders = 3
)

func fillRegion(dst []byte, region, version uint32) {
	for i := 0; i < len(dst)/chunk; i++ {
		c := dst[i*chunk : (i+1)*chunk]
		binary.LittleEndian.PutUint32(c[0:], region)
		binary.LittleEndian.PutUint32(c[4:], version)
		binary.LittleEndian.PutUint32(c[8:], uint32(i))
		binary.LittleEndian.PutUint32(c[12:], region*2654435761^version*40503^uint32(i)*97)
	}
}

// checkChunks verifies the chunks of buf, which starts at file offset off
// (a multiple of chunk); an all-zero chunk is a region never written.
func checkChunks(buf []byte, off int64) error {
	for i := 0; i+chunk <= len(buf); i += chunk {
		c := buf[i : i+chunk]
		pos := off + int64(i)
		region := uint32(pos / regionSize)
		idx := uint32(pos % regionSize / chunk)
		r := binary.LittleEndian.Uint32(c[0:])
		v := binary.LittleEndian.Uint32(c[4:])
		k := binary.LittleEndian.Uint32(c[8:])
		sum := binary.LittleEndian.Uint32(c[12:])
		if r == 0 && v == 0 && k == 0 && sum == 0 {
			continue
		}
		if r != region || k != idx || sum != r*2654435761^v*40503^k*97 {
			return fmt.Errorf("chunk at %d: region %d idx %d (want %d, %d), version %d, check ok=%v",
				pos, r, k, region, idx, v, sum == r*2654435761^v*40503^k*97)
		}
	}
	return nil
}

func TestConcurrentReadWrite(t *testing.T) {
	for _, mode := range []struct {
		name  string
		flags int
	}{{"buffered", 0}, {"direct", syscall.O_DIRECT}} {
		t.Run(mode.name, func(t *testing.T) {
			m := mountTest(t, Options{})
			path := m.view("enc/shared.vmdk")
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			versions := make([]uint32, regions) // final version per region
			deadline := time.Now().Add(2 * time.Second)
			var wg sync.WaitGroup
			errs := make(chan error, concWriters+concReaders)
			for w := 0; w < concWriters; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					f, err := os.OpenFile(path, os.O_RDWR|mode.flags, 0)
					if err != nil {
						errs <- err
						return
					}
					defer f.Close()
					r := rand.New(rand.NewPCG(uint64(w), 99))
					buf := make([]byte, regionSize)
					got := make([]byte, regionSize)
					for ops := 0; time.Now().Before(deadline) || ops < 20; ops++ {
						// Regions w, w+concWriters, ... are this writer's.
						reg := uint32(r.IntN(regions/concWriters)*concWriters + w)
						versions[reg]++
						v := versions[reg]
						fillRegion(buf[:regionSize], reg, v)
						// Write the region whole or in two pieces split
						// at a chunk boundary, to mix partial units.
						off := int64(reg) * regionSize
						if r.IntN(2) == 0 {
							if _, err := f.WriteAt(buf[:regionSize], off); err != nil {
								errs <- err
								return
							}
						} else {
							cut := (1 + r.IntN(regionSize/chunk-1)) * chunk
							if _, err := f.WriteAt(buf[cut:regionSize], off+int64(cut)); err != nil {
								errs <- err
								return
							}
							if _, err := f.WriteAt(buf[:cut], off); err != nil {
								errs <- err
								return
							}
						}
						// Read own region back: exact.
						n, err := f.ReadAt(got[:regionSize], off)
						if err != nil && err != io.EOF {
							errs <- err
							return
						}
						if n != regionSize {
							errs <- fmt.Errorf("writer %d: short read of region %d: %d", w, reg, n)
							return
						}
						if i := firstDiff(got[:regionSize], buf[:regionSize]); i >= 0 {
							errs <- fmt.Errorf("writer %d: region %d v%d reads back wrong at byte %d: %v", w, reg, v, i, checkChunks(got[:regionSize], off))
							return
						}
					}
				}()
			}
			for rd := 0; rd < concReaders; rd++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					f, err := os.OpenFile(path, os.O_RDONLY|mode.flags, 0)
					if err != nil {
						errs <- err
						return
					}
					defer f.Close()
					r := rand.New(rand.NewPCG(uint64(rd), 7))
					buf := make([]byte, 256<<10)
					for time.Now().Before(deadline) {
						off := int64(r.IntN(regions*regionSize/chunk)) * chunk
						n := chunk * (1 + r.IntN(len(buf)/chunk))
						k, err := f.ReadAt(buf[:n], off)
						if err != nil && err != io.EOF {
							errs <- err
							return
						}
						if err := checkChunks(buf[:k/chunk*chunk], off); err != nil {
							errs <- fmt.Errorf("reader %d: %w", rd, err)
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			if t.Failed() {
				t.Logf("view log:\n%s", m.logs.String())
				return
			}
			// Final state: every region at its last version.
			waitReleased(t, m.v)
			want := make([]byte, 0, regions*regionSize)
			r := make([]byte, regionSize)
			last := 0
			for reg, v := range versions {
				if v == 0 {
					clear(r)
				} else {
					fillRegion(r, uint32(reg), v)
					last = (reg + 1) * regionSize
				}
				want = append(want, r...)
			}
			want = want[:last]
			md := &model{b: want}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			checkFile(t, f, md, "final content")
			checkAtRest(t, m, "enc/shared.vmdk", true, md)
		})
	}
}

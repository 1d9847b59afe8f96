// Package bench measures vmcryptd's sector cipher and its mounts against
// references measured in the same run (OpenSSL for the cipher, gocryptfs
// for the FUSE view). Production code never imports it: it exists for
// `vmcryptd bench`, `go test -bench ./bench/` and the scripts beside it.
package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/xts"
)

// Result is one throughput figure. Its JSON form is the element type of
// `vmcryptd bench --json`.
type Result struct {
	Impl        string  `json:"impl"`
	Chosen      bool    `json:"chosen"`
	Op          string  `json:"op"`
	Unit        int     `json:"unit"`
	Threads     int     `json:"threads"`
	BytesPerSec float64 `json:"bytes_per_sec"`
}

// Ops measured, in the order they are reported.
var opNames = [...]string{"encrypt", "decrypt"}

// CipherOptions selects what MeasureCipher runs.
type CipherOptions struct {
	Impls    []xts.Impl    // implementations to measure
	Chosen   xts.Impl      // the one the engine would pick (flagged in results)
	Units    []int         // data-unit sizes in bytes
	Threads  []int         // goroutine counts
	Duration time.Duration // per measurement
}

// MeasureCipher runs every (impl, op, unit, threads) combination for
// opts.Duration each. Like `openssl speed`, every call processes exactly
// one data unit from a buffer that stays in cache, so the two figures
// measure the same thing: per-unit cost including tweak setup.
func MeasureCipher(ctx context.Context, opts CipherOptions) ([]Result, error) {
	key := make([]byte, 64)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("bench: random key: %w", err)
	}
	defer clear(key)
	var out []Result
	for _, impl := range opts.Impls {
		for _, unit := range opts.Units {
			c, err := xts.New(key, unit, impl)
			if err != nil {
				return nil, fmt.Errorf("bench: %s unit %d: %w", impl, unit, err)
			}
			for _, op := range opNames {
				for _, threads := range opts.Threads {
					if err := ctx.Err(); err != nil {
						c.Close()
						return out, err
					}
					bps, err := measure(c, op, threads, opts.Duration)
					if err != nil {
						c.Close()
						return nil, err
					}
					out = append(out, Result{Impl: string(impl), Chosen: impl == opts.Chosen,
						Op: op, Unit: unit, Threads: threads, BytesPerSec: bps})
				}
			}
			c.Close()
		}
	}
	return out, nil
}

// measure runs threads goroutines, each encrypting (or decrypting) its
// own one-unit buffer in place in a loop, and returns total bytes/s.
func measure(c *xts.Cipher, op string, threads int, d time.Duration) (float64, error) {
	if threads < 1 {
		return 0, fmt.Errorf("bench: threads must be at least 1, got %d", threads)
	}
	unit := c.UnitSize()
	fn := c.Encrypt
	if op == "decrypt" {
		fn = c.Decrypt
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		total  int64
		runErr error
	)
	start := time.Now()
	deadline := start.Add(d)
	for t := 0; t < threads; t++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, unit)
			var n int64
			var u uint64
			for {
				// Check the clock every 64 units: cheap next to the work.
				for i := 0; i < 64; i++ {
					if err := fn(buf, buf, u); err != nil {
						mu.Lock()
						runErr = err
						mu.Unlock()
						return
					}
					u++
				}
				n += 64 * int64(unit)
				if time.Now().After(deadline) {
					break
				}
			}
			mu.Lock()
			total += n
			mu.Unlock()
		}()
	}
	wg.Wait()
	if runErr != nil {
		return 0, fmt.Errorf("bench: %s %s: %w", c.Impl(), op, runErr)
	}
	return float64(total) / time.Since(start).Seconds(), nil
}

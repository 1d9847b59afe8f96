package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
)

// ConversionResult compares encrypting a file in place with copying it
// with cp on the same filesystem, measured in the same run.
type ConversionResult struct {
	Bytes        int64   `json:"bytes"`
	CPBytesPerS  float64 `json:"cp_bytes_per_sec"`
	EncBytesPerS float64 `json:"encrypt_bytes_per_sec"`
	DecBytesPerS float64 `json:"decrypt_bytes_per_sec"`
}

// MeasureConversion writes a dense random file of size bytes in dir,
// times `cp` of it, then container.EncryptFile and container.DecryptFile, and
// removes everything. Each figure is the best of rounds runs.
func MeasureConversion(ctx context.Context, dir string, size int64, rounds int) (*ConversionResult, error) {
	work, err := os.MkdirTemp(dir, "vmcryptd-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	src := filepath.Join(work, "src")
	f, err := os.Create(src)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		rand.Read(buf)
		n := min(int64(len(buf)), size-off)
		if _, err := f.Write(buf[:n]); err != nil {
			f.Close()
			return nil, fmt.Errorf("bench: write test file: %w", err)
		}
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	dek, err := keys.NewDEK()
	if err != nil {
		return nil, err
	}
	defer dek.Destroy()
	res := &ConversionResult{Bytes: size}
	best := func(cur *float64, d time.Duration) {
		if bps := float64(size) / d.Seconds(); bps > *cur {
			*cur = bps
		}
	}
	for r := 0; r < rounds; r++ {
		dst := filepath.Join(work, "cp")
		t0 := time.Now()
		// cp then sync: EncryptFile fsyncs its result, so cp must too.
		if out, err := exec.CommandContext(ctx, "cp", src, dst).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("bench: cp: %v: %s", err, out)
		}
		if err := syncFile(dst); err != nil {
			return nil, err
		}
		best(&res.CPBytesPerS, time.Since(t0))
		os.Remove(dst)

		t0 = time.Now()
		opts := container.CreateOptions{Kind: container.KindOther, Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: "bench"}}
		if err := container.EncryptFile(ctx, src, dek, opts, nil); err != nil {
			return nil, err
		}
		best(&res.EncBytesPerS, time.Since(t0))
		t0 = time.Now()
		if err := container.DecryptFile(ctx, src, dek, nil); err != nil {
			return nil, err
		}
		best(&res.DecBytesPerS, time.Since(t0))
	}
	return res, nil
}

func syncFile(p string) error {
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

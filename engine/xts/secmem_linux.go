//go:build linux

package xts

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Key schedules are key material, so they live outside the Go heap: the GC
// may copy or retain heap objects, heap pages can be swapped out and end up
// in core dumps. An anonymous mapping is page aligned (which the legacy-SSE
// kernel's aligned memory operands rely on), can be locked into RAM, excluded
// from core dumps, and is zeroed and unmapped deterministically on Close.

// allocSecret returns a zeroed, page-aligned region of at least n bytes
// outside the Go heap, locked in memory when the process may lock it.
func allocSecret(n int) ([]byte, error) {
	ps := unix.Getpagesize()
	size := (n + ps - 1) / ps * ps
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("xts: mmap for key schedule: %w", err)
	}
	// mlock fails with EPERM (no CAP_IPC_LOCK) or ENOMEM (RLIMIT_MEMLOCK
	// exhausted) for unprivileged processes; the memory then works the same,
	// it just may be swapped. Any other error is unexpected.
	if err := unix.Mlock(b); err != nil && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.ENOMEM) {
		_ = unix.Munmap(b)
		return nil, fmt.Errorf("xts: mlock key schedule: %w", err)
	}
	// Best effort: keep the keys out of core dumps; and out of a forked
	// child (a fork without exec would otherwise copy them).
	_ = unix.Madvise(b, unix.MADV_DONTDUMP)
	_ = unix.Madvise(b, unix.MADV_WIPEONFORK)
	return b, nil
}

// freeSecret zeroes, unlocks and unmaps a region from allocSecret.
func freeSecret(b []byte) {
	clear(b)
	_ = unix.Munlock(b)
	_ = unix.Munmap(b)
}

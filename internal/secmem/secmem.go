// Package secmem hands out memory for key material that never reaches the
// Go heap, swap or a core dump: anonymous mappings, mlock'ed, excluded from
// dumps, and zeroed before they are returned to the kernel.
//
// The Go garbage collector may copy heap objects and leaves freed memory
// unzeroed, so a KEK or DEK kept in an ordinary slice can linger in
// several places. Keys live here instead, and code copies them out only
// into short-lived buffers that it clears at once.
package secmem

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Buffer is a locked region holding key material. The zero value is an
// empty, already-freed buffer.
type Buffer struct {
	mem    []byte // whole mapping (page multiple)
	n      int    // bytes in use
	locked bool
}

// Alloc returns a zeroed buffer of n bytes (n > 0). mlock may fail where
// RLIMIT_MEMLOCK is small; the buffer then still works but Locked reports
// false so the caller can log it once.
func Alloc(n int) (*Buffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("secmem: invalid size %d", n)
	}
	page := os.Getpagesize()
	size := (n + page - 1) / page * page
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("secmem: mmap %d bytes: %w", size, err)
	}
	// Best effort: neither failure makes the memory less usable, only less
	// protected; Locked reports the mlock outcome.
	_ = unix.Madvise(mem, unix.MADV_DONTDUMP)
	_ = unix.Madvise(mem, unix.MADV_DONTFORK)
	locked := unix.Mlock(mem) == nil
	return &Buffer{mem: mem, n: n, locked: locked}, nil
}

// FromBytes allocates a buffer holding a copy of b and clears b.
func FromBytes(b []byte) (*Buffer, error) {
	buf, err := Alloc(len(b))
	if err != nil {
		clear(b)
		return nil, err
	}
	copy(buf.mem, b)
	clear(b)
	return buf, nil
}

// Bytes returns the key bytes. The slice aliases locked memory: do not
// keep it past Free and do not append to it.
func (b *Buffer) Bytes() []byte {
	if b == nil || b.mem == nil {
		return nil
	}
	return b.mem[:b.n:b.n]
}

// Len is the number of key bytes.
func (b *Buffer) Len() int {
	if b == nil || b.mem == nil {
		return 0
	}
	return b.n
}

// Locked reports whether mlock succeeded for this buffer.
func (b *Buffer) Locked() bool { return b != nil && b.locked }

// wipe zeroes the whole mapping, not only the bytes in use.
func (b *Buffer) wipe() { clear(b.mem) }

// Free zeroes the memory, unlocks and unmaps it. It is safe to call more
// than once.
func (b *Buffer) Free() error {
	if b == nil || b.mem == nil {
		return nil
	}
	b.wipe()
	var errs []error
	if b.locked {
		if err := unix.Munlock(b.mem); err != nil {
			errs = append(errs, fmt.Errorf("munlock: %w", err))
		}
	}
	if err := unix.Munmap(b.mem); err != nil {
		errs = append(errs, fmt.Errorf("munmap: %w", err))
	}
	b.mem, b.n, b.locked = nil, 0, false
	if len(errs) > 0 {
		return fmt.Errorf("secmem: free: %w", errors.Join(errs...))
	}
	return nil
}

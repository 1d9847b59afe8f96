package container

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// Container I/O: unit range locks, reads, writes (copy-on-write or in
// place), truncate, hole punching and sync.

// lockRange takes the stripes of units [u0, u1] in ascending stripe order
// (so two ranges can never deadlock); release them with unlock. The
// groups of a range map to at most two ascending runs of stripe indexes
// (the second when the range wraps past the last stripe), so no scan or
// allocation is needed.
func (c *Container) lockRange(u0, u1 int64, write bool) rangeLock {
	g0, g1 := u0/unitsPerStripe, u1/unitsPerStripe
	l := rangeLock{c: c, n: 1, write: write}
	if g1-g0+1 >= stripeCount {
		l.runs[0] = [2]int{0, stripeCount - 1}
	} else {
		s0, s1 := int(g0%stripeCount), int(g1%stripeCount)
		if s0 <= s1 {
			l.runs[0] = [2]int{s0, s1}
		} else { // wrapped: the low run first keeps the global order
			l.runs[0], l.runs[1], l.n = [2]int{0, s1}, [2]int{s0, stripeCount - 1}, 2
		}
	}
	for r := 0; r < l.n; r++ {
		for i := l.runs[r][0]; i <= l.runs[r][1]; i++ {
			if write {
				c.stripes[i].Lock()
			} else {
				c.stripes[i].RLock()
			}
		}
	}
	return l
}

// rangeLock is a range of stripes held by lockRange. It is a value, not
// a closure, so that taking a range costs no allocation per request.
type rangeLock struct {
	c     *Container
	runs  [2][2]int // [first, last] stripe indexes, inclusive
	n     int
	write bool
}

func (l *rangeLock) unlock() {
	for r := 0; r < l.n; r++ {
		for i := l.runs[r][0]; i <= l.runs[r][1]; i++ {
			if l.write {
				l.c.stripes[i].Unlock()
			} else {
				l.c.stripes[i].RUnlock()
			}
		}
	}
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 1<<20+2*DefaultUnitSize); return &b }}

func getBuf(n int) (*[]byte, []byte) {
	p := bufPool.Get().(*[]byte)
	if cap(*p) < n {
		*p = make([]byte, n)
	}
	return p, (*p)[:n]
}

func putBuf(p *[]byte) {
	if cap(*p) <= 8<<20 {
		bufPool.Put(p)
	}
}

// ReadAt reads plaintext. Reads past the logical size return io.EOF like
// os.File. Units whose ciphertext is all zero (never written: holes in the
// backing file, or fallocated space) read as zeros.
func (c *Container) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s: negative offset", c.path)
	}
	c.resize.RLock()
	defer c.resize.RUnlock()
	size := c.Size()
	if off >= size {
		return 0, io.EOF
	}
	want := len(p)
	if int64(want) > size-off {
		want = int(size - off)
	}
	if want == 0 {
		return 0, nil
	}
	u0 := off / c.unit
	u1 := (off + int64(want) - 1) / c.unit
	lk := c.lockRange(u0, u1, false)
	defer lk.unlock()

	n := int((u1 - u0 + 1) * c.unit)
	var buf []byte
	var pooled *[]byte
	if off%c.unit == 0 && want == n {
		buf = p[:n] // aligned: decrypt straight into the caller's buffer
	} else {
		pooled, buf = getBuf(n)
		defer putBuf(pooled)
	}
	if err := c.readUnits(buf, u0); err != nil {
		return 0, err
	}
	if pooled != nil {
		copy(p[:want], buf[off-u0*c.unit:])
	}
	if want < len(p) {
		return want, io.EOF
	}
	return want, nil
}

// readUnits fills buf (whole units from u0) with plaintext.
func (c *Container) readUnits(buf []byte, u0 int64) error {
	pos := c.payloadOff + u0*c.unit
	if n, err := c.f.ReadAt(buf, pos); n < len(buf) {
		if err == nil || err == io.EOF {
			return fmt.Errorf("read %s: %w: unit %d beyond end of backing file", c.path, ErrTruncated, u0+int64(n)/c.unit)
		}
		return fmt.Errorf("read %s: %w", c.path, err)
	}
	return c.cryptRuns(buf, u0, false)
}

// cryptRuns de/encrypts buf in place unit by unit, skipping all-zero
// ciphertext units on decrypt, batching contiguous runs into one call and
// spreading large requests over the cores.
func (c *Container) cryptRuns(buf []byte, u0 int64, encrypt bool) error {
	if encrypt {
		return c.parallel(buf, u0, true)
	}
	unit := int(c.unit)
	nUnits := len(buf) / unit
	start := -1
	for i := 0; i <= nUnits; i++ {
		zero := i < nUnits && IsZero(buf[i*unit:(i+1)*unit])
		if i < nUnits && !zero {
			if start < 0 {
				start = i
			}
			continue
		}
		if start >= 0 {
			if err := c.parallel(buf[start*unit:i*unit], u0+int64(start), false); err != nil {
				return err
			}
			start = -1
		}
	}
	return nil
}

func (c *Container) parallel(buf []byte, u0 int64, encrypt bool) error {
	workers := runtime.GOMAXPROCS(0)
	if c.serial || len(buf) < parallelMin || workers < 2 || (encrypt && c.writing.Load() > 1) {
		// Direct calls: a method value would cost an allocation on
		// every (small) request.
		var err error
		if encrypt {
			err = c.xts.Encrypt(buf, buf, uint64(u0))
		} else {
			err = c.xts.Decrypt(buf, buf, uint64(u0))
		}
		if err != nil {
			return fmt.Errorf("%s: %w", c.path, err)
		}
		return nil
	}
	fn := c.xts.Decrypt
	if encrypt {
		fn = c.xts.Encrypt
	}
	unit := int(c.unit)
	units := len(buf) / unit
	per := (units + workers - 1) / workers
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := 0; w < workers; w++ {
		a, b := w*per, min((w+1)*per, units)
		if a >= b {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[w] = fn(buf[a*unit:b*unit], buf[a*unit:b*unit], uint64(u0)+uint64(a))
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: %w", c.path, err)
	}
	return nil
}

func IsZero(b []byte) bool {
	// Ciphertext almost never starts with zero bytes, so this usually
	// returns after one comparison.
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// WriteAt writes plaintext, extending the logical size if needed. Only
// the first and last unit of a request are read back (when partially
// covered); p itself is never modified (io.WriterAt), so the request is
// copied into a scratch buffer and encrypted there.
func (c *Container) WriteAt(p []byte, off int64) (int, error) {
	return c.write(p, off, false)
}

// WriteAtInPlace is WriteAt for a caller that hands p over: it encrypts
// the whole units p covers in place, in p, and writes them from there,
// saving WriteAt's copy of the request. Partially covered first and last
// units are still read back and encrypted in a scratch buffer. Whatever
// it returns, p's contents are undefined afterwards (ciphertext, in
// part or in whole); p is not retained. The FUSE view uses it for WRITE
// requests, whose buffer is discarded after the reply.
func (c *Container) WriteAtInPlace(p []byte, off int64) (int, error) {
	return c.write(p, off, true)
}

func (c *Container) write(p []byte, off int64, inPlace bool) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("write %s: negative offset", c.path)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off > MaxLogicalSize-int64(len(p)) {
		return 0, fmt.Errorf("write %s: %w", c.path, ErrTooLarge)
	}
	c.writing.Add(1)
	defer c.writing.Add(-1)
	c.resize.RLock()
	defer c.resize.RUnlock()
	end := off + int64(len(p))
	u0 := off / c.unit
	u1 := (end - 1) / c.unit
	lk := c.lockRange(u0, u1, true)
	defer lk.unlock()

	oldSize := c.Size()
	oldUnits := (oldSize + c.unit - 1) / c.unit
	// [a, b) is the run of whole units inside the request.
	a := (off + c.unit - 1) / c.unit * c.unit
	b := end / c.unit * c.unit
	var err error
	if inPlace && a < b {
		err = c.writeInPlace(p, off, a, b, oldUnits)
	} else {
		err = c.writeCopy(p, off, oldUnits)
	}
	if err != nil {
		return 0, err
	}
	if end > oldSize {
		c.hdrMu.Lock()
		if end > c.hdr.Size {
			// The new size reaches the header at Sync or Close, after the
			// data: a header written now could reach the disk before the
			// file's own size does, and a power loss would then leave a
			// header pointing past the end of the file. Like any file
			// system, size growth without fsync may be lost in a crash.
			c.hdr.Size = end
			c.hdrDirty = true
		}
		c.hdrMu.Unlock()
	}
	return len(p), nil
}

// writeCopy encrypts a copy of p (with the partial first and last units
// read back) and writes it. Caller holds the range's stripes.
func (c *Container) writeCopy(p []byte, off int64, oldUnits int64) error {
	end := off + int64(len(p))
	u0 := off / c.unit
	u1 := (end - 1) / c.unit
	n := int((u1 - u0 + 1) * c.unit)
	pooled, buf := getBuf(n)
	defer putBuf(pooled)

	head := off - u0*c.unit
	tailEnd := end - u0*c.unit
	// Read back the partial first and last units if they hold data.
	if head != 0 || (tailEnd < c.unit && u0 == u1) {
		if err := c.fillUnit(buf[:c.unit], u0, oldUnits); err != nil {
			return err
		}
	}
	if u1 != u0 && tailEnd%c.unit != 0 {
		last := buf[int(u1-u0)*int(c.unit):]
		if err := c.fillUnit(last, u1, oldUnits); err != nil {
			return err
		}
	}
	copy(buf[head:], p)
	if err := c.cryptRuns(buf, u0, true); err != nil {
		return err
	}
	if _, err := c.f.WriteAt(buf, c.payloadOff+u0*c.unit); err != nil {
		return fmt.Errorf("write %s: %w", c.path, err)
	}
	return nil
}

// writeInPlace encrypts the whole units [a, b) of the request (a < b,
// both unit-aligned, within [off, off+len(p))) in p itself; a partial
// unit before a or after b is read back, merged and encrypted in a
// scratch unit. Caller holds the range's stripes.
func (c *Container) writeInPlace(p []byte, off, a, b, oldUnits int64) error {
	end := off + int64(len(p))
	unit := int(c.unit)
	var headBuf, tailBuf []byte
	if a > off { // partial first unit: its tail comes from p
		pooled, buf := getBuf(unit)
		defer putBuf(pooled)
		headBuf = buf
		u := off / c.unit
		if err := c.fillUnit(headBuf, u, oldUnits); err != nil {
			return err
		}
		copy(headBuf[off-u*c.unit:], p[:a-off])
	}
	if end > b { // partial last unit: its head comes from p
		pooled, buf := getBuf(unit)
		defer putBuf(pooled)
		tailBuf = buf
		if err := c.fillUnit(tailBuf, b/c.unit, oldUnits); err != nil {
			return err
		}
		copy(tailBuf, p[b-off:])
	}
	mid := p[a-off : b-off]
	if err := c.cryptRuns(mid, a/c.unit, true); err != nil {
		return err
	}
	if headBuf != nil {
		if err := c.cryptRuns(headBuf, a/c.unit-1, true); err != nil {
			return err
		}
		if _, err := c.f.WriteAt(headBuf, c.payloadOff+a-c.unit); err != nil {
			return fmt.Errorf("write %s: %w", c.path, err)
		}
	}
	if _, err := c.f.WriteAt(mid, c.payloadOff+a); err != nil {
		return fmt.Errorf("write %s: %w", c.path, err)
	}
	if tailBuf != nil {
		if err := c.cryptRuns(tailBuf, b/c.unit, true); err != nil {
			return err
		}
		if _, err := c.f.WriteAt(tailBuf, c.payloadOff+b); err != nil {
			return fmt.Errorf("write %s: %w", c.path, err)
		}
	}
	return nil
}

// fillUnit puts unit u's plaintext into dst, or zeros if u lies beyond the
// current data.
func (c *Container) fillUnit(dst []byte, u, units int64) error {
	if u >= units {
		clear(dst)
		return nil
	}
	return c.readUnits(dst, u)
}

// Truncate sets the logical size. Shrinking zeroes the tail of the new
// last unit (so a later extension reads zeros, not old data) and frees
// whole units; growing leaves holes that read as zeros.
func (c *Container) Truncate(size int64) error {
	if size < 0 {
		return fmt.Errorf("truncate %s: negative size", c.path)
	}
	if size > MaxLogicalSize {
		return fmt.Errorf("truncate %s: %w", c.path, ErrTooLarge)
	}
	c.resize.Lock()
	defer c.resize.Unlock()
	c.hdrMu.Lock()
	defer c.hdrMu.Unlock()
	old := c.hdr.Size
	if size == old {
		return nil
	}
	units := (size + c.unit - 1) / c.unit
	if size < old {
		if rem := size % c.unit; rem != 0 {
			u := size / c.unit
			buf := make([]byte, c.unit)
			if err := c.readUnits(buf, u); err != nil {
				return fmt.Errorf("truncate %s: %w", c.path, err)
			}
			if !IsZero(buf) { // a hole stays a hole
				clear(buf[rem:])
				if err := c.cryptRuns(buf, u, true); err != nil {
					return err
				}
				if _, err := c.f.WriteAt(buf, c.payloadOff+u*c.unit); err != nil {
					return fmt.Errorf("truncate %s: %w", c.path, err)
				}
			}
		}
	}
	// A header must never claim more than the file holds: when shrinking,
	// the smaller size is made durable before the file is cut; when
	// growing, the file grows first and the size follows at Sync/Close.
	if size < old {
		if err := c.syncDataLocked(); err != nil {
			return fmt.Errorf("truncate %s: %w", c.path, err)
		}
		c.hdr.Size = size
		if err := c.writeHeaderLocked(); err != nil {
			c.hdr.Size = old // the file was not cut: its units stay covered
			return fmt.Errorf("truncate %s: %w", c.path, err)
		}
		if err := c.f.Truncate(c.payloadOff + units*c.unit); err != nil {
			return fmt.Errorf("truncate %s: %w", c.path, err)
		}
		return nil
	}
	if err := c.f.Truncate(c.payloadOff + units*c.unit); err != nil {
		return fmt.Errorf("truncate %s: %w", c.path, err)
	}
	c.hdr.Size = size
	c.hdrDirty = true
	return nil
}

// syncDataLocked makes data durable before a header change that depends
// on it.
func (c *Container) syncDataLocked() error {
	return unix.Fdatasync(int(c.f.Fd()))
}

// PunchHole makes [off, off+length) read as zeros: whole units become
// holes in the backing file, partial units are rewritten.
func (c *Container) PunchHole(off, length int64) error {
	if off < 0 || length <= 0 {
		return fmt.Errorf("punch hole %s: invalid range", c.path)
	}
	size := c.Size()
	if off >= size {
		return nil
	}
	end := min(off+length, size)
	first := (off + c.unit - 1) / c.unit // first whole unit
	last := end / c.unit                 // one past the last whole unit
	if first < last {
		c.resize.RLock()
		lk := c.lockRange(first, last-1, true)
		err := unix.Fallocate(int(c.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE,
			c.payloadOff+first*c.unit, (last-first)*c.unit)
		lk.unlock()
		c.resize.RUnlock()
		if err != nil {
			return fmt.Errorf("punch hole %s: %w", c.path, err)
		}
	}
	zeroRange := func(a, b int64) error {
		if a >= b {
			return nil
		}
		_, err := c.WriteAt(make([]byte, b-a), a)
		return err
	}
	if first >= last {
		return zeroRange(off, end)
	}
	if err := zeroRange(off, first*c.unit); err != nil {
		return err
	}
	return zeroRange(last*c.unit, end)
}

// Sync makes written data and the header durable: data first, then the
// header, so a crash can lose a size update but never point the size at
// data that was not written.
func (c *Container) Sync() error {
	// hdrMu first: a size recorded after the data sync could cover data
	// that sync did not include.
	c.hdrMu.Lock()
	defer c.hdrMu.Unlock()
	if err := unix.Fdatasync(int(c.f.Fd())); err != nil {
		return fmt.Errorf("sync %s: %w", c.path, err)
	}
	if c.hdrDirty {
		if err := c.writeHeaderLocked(); err != nil { // durable when it returns
			return fmt.Errorf("sync %s: %w", c.path, err)
		}
	}
	return nil
}

// writeUnits encrypts whole units from p (len a multiple of the unit,
// off unit-aligned, within the logical size set by Truncate) and writes
// them; conversions use it to skip WriteAt's size bookkeeping. The final
// unit may be partial only at the end of the file.
func (c *Container) writeUnits(p []byte, off int64) (int, error) {
	if off%c.unit != 0 {
		return 0, fmt.Errorf("write %s: unaligned conversion write at %d", c.path, off)
	}
	if int64(len(p))%c.unit != 0 {
		return c.WriteAt(p, off)
	}
	c.resize.RLock()
	defer c.resize.RUnlock()
	u0 := off / c.unit
	lk := c.lockRange(u0, u0+int64(len(p))/c.unit-1, true)
	defer lk.unlock()
	if err := c.cryptRuns(p, u0, true); err != nil {
		return 0, err
	}
	if _, err := c.f.WriteAt(p, c.payloadOff+off); err != nil {
		return 0, fmt.Errorf("write %s: %w", c.path, err)
	}
	return len(p), nil
}

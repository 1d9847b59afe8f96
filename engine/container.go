package engine

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/xts"
)

// MaxLogicalSize is the largest logical size a container can record.
const MaxLogicalSize = 1 << 62

// ErrTooLarge is returned for writes or truncates past MaxLogicalSize.
var ErrTooLarge = errors.New("file too large for a container (2^62 bytes)")

// Container is an open encrypted file: a 4 KiB header then XTS-AES-256
// data units (docs/FORMAT.md). It offers ReadAt/WriteAt on the plaintext,
// is safe for concurrent use, and lets I/O on different units run in
// parallel: only partial-unit writes need read-modify-write, under a lock
// striped by unit group.
type Container struct {
	f    *os.File
	path string
	keys *containerKeys
	xts  *xts.Cipher
	unit int64
	// payloadOff is fixed for the container's life; kept outside hdr so
	// data I/O never touches the header lock.
	payloadOff int64

	// resize is held shared by every read and write and exclusively by
	// Truncate, so a shrinking file never races a write past its end.
	resize sync.RWMutex
	// stripes serialise read-modify-write of the units in one group.
	stripes [stripeCount]sync.RWMutex

	// serial keeps en/decryption of one request on the calling goroutine;
	// set by conversions, which already run one worker per core.
	serial bool
	// writing counts writes in progress. While another write keeps a
	// core busy (page-cache writeback sends several at once), splitting
	// this one's encryption across cores only adds hand-offs: measured
	// 1.08x-1.12x on buffered 1 MiB writes. Reads stay split: measured
	// 0.94x serial, even with two readahead requests in flight.
	writing atomic.Int32

	hdrMu    sync.Mutex // guards hdr, size changes and header writes
	hdr      Header
	hdrDirty bool // size changed since the last header write
	health   HeaderHealth
	closed   bool
}

const (
	stripeCount = 1024
	// unitsPerStripe groups units so a 1 MiB request takes 16 stripes, not 256.
	unitsPerStripe = 16
	// parallelMin is the request size from which en/decryption is split
	// across cores; below it, goroutine hand-off costs more than it saves.
	parallelMin = 256 << 10
)

// CreateOptions describes a new container.
type CreateOptions struct {
	Kind     Kind
	Binding  Binding
	UnitSize int // 0 means DefaultUnitSize
	Impl     xts.Impl
	Perm     os.FileMode // 0 means 0600
	// EmbeddedKeySafe, when set, is stored in the header's keySafe area
	// (FORMAT.md 3.4) for containers whose key has no text file to live in.
	EmbeddedKeySafe string

	fileID *[16]byte // fixed file id, for the FORMAT.md vectors only
}

// CreateContainer creates path, which must not exist, as an empty
// container.
func CreateContainer(path string, dek *DEK, opts CreateOptions) (*Container, error) {
	unit := opts.UnitSize
	if unit == 0 {
		unit = DefaultUnitSize
	}
	if !validUnitSize(unit) {
		return nil, fmt.Errorf("create %s: data unit size %d (want 512, 1024, 2048 or 4096)", path, unit)
	}
	if _, ok := kindNames[opts.Kind]; !ok {
		return nil, fmt.Errorf("create %s: unknown kind %d", path, opts.Kind)
	}
	perm := opts.Perm
	if perm == 0 {
		perm = 0o600
	}
	keys, err := deriveContainerKeys(dek)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	h := Header{Kind: opts.Kind, UnitSize: unit, PayloadOff: HeaderSize, Binding: opts.Binding, Fingerprint: keys.fingerprint}
	if opts.fileID != nil {
		h.FileID = *opts.fileID
	} else if _, err := rand.Read(h.FileID[:]); err != nil {
		keys.destroy()
		return nil, fmt.Errorf("create %s: crypto/rand: %w", path, err)
	}
	// O_EXCL|O_NOFOLLOW: never write through a symlink or over a file
	// someone planted at the name; callers remove their own leftovers.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		keys.destroy()
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	if err := f.Chmod(perm); err != nil { // by fd, and not reduced by umask
		f.Close()
		os.Remove(path)
		keys.destroy()
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	c, err := newContainer(f, path, keys, h, opts.Impl)
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	if opts.EmbeddedKeySafe != "" {
		for i := 0; i < 2; i++ {
			b, err := marshalKSCopy(opts.EmbeddedKeySafe, 1)
			if err == nil {
				_, err = f.WriteAt(b, int64(ksAreaOff+i*ksCopySize))
			}
			if err != nil {
				c.Close()
				os.Remove(path)
				return nil, fmt.Errorf("create %s: %w", path, err)
			}
		}
	}
	// Both slots, sequence 1: a reader never sees a half-initialised header.
	c.hdrMu.Lock()
	err = c.writeHeaderLocked()
	c.hdrMu.Unlock()
	if err != nil {
		c.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	if err := f.Truncate(HeaderSize); err != nil {
		c.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	return c, nil
}

// OpenContainer opens an existing container with its DEK. It verifies the
// header MAC and the key fingerprint and checks the file is not truncated.
// readOnly opens the backing file O_RDONLY. A degraded container (one
// header slot damaged, FORMAT.md 3.1) is refused with ErrDegraded: every
// conversion and every writer goes through here.
func OpenContainer(path string, dek *DEK, readOnly bool, impl xts.Impl) (*Container, error) {
	return openContainer(path, dek, readOnly, false, impl)
}

// OpenContainerDegraded opens a container read-only and also accepts a
// degraded one (Health says so): for readers that serve what the
// surviving slot records, such as a view's read-only open and `vm check`.
func OpenContainerDegraded(path string, dek *DEK, impl xts.Impl) (*Container, error) {
	return openContainer(path, dek, true, true, impl)
}

func openContainer(path string, dek *DEK, readOnly, allowDegraded bool, impl xts.Impl) (*Container, error) {
	f, err := openRegular(path, openFlag(readOnly))
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return openContainerFile(f, path, dek, allowDegraded, impl)
}

func openFlag(readOnly bool) int {
	if readOnly {
		return os.O_RDONLY
	}
	return os.O_RDWR
}

// openContainerFile opens the container on the already open file f (named
// path in errors), which it owns from here on: closed on every error, kept
// by the Container otherwise. The view decides on a file and serves the
// same descriptor (Datastore.Open), so a rename between the two cannot
// swap what it serves.
func openContainerFile(f *os.File, path string, dek *DEK, allowDegraded bool, impl xts.Impl) (*Container, error) {
	readOnly := false
	if fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0); err == nil {
		readOnly = fl&unix.O_ACCMODE == unix.O_RDONLY
	}
	region := make([]byte, 2*slotSize)
	if n, err := f.ReadAt(region, 0); n < len(region) {
		f.Close()
		if err == nil || err == io.EOF {
			return nil, fmt.Errorf("open %s: %w (file is %d bytes)", path, ErrNotContainer, n)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	keys, err := deriveContainerKeys(dek)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	h, health, err := verifyHeader(region, keys)
	if err != nil {
		keys.destroy()
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if health.Degraded != "" {
		if end, ok := dataBeyond(f, h.MinBackingSize()); ok {
			health.Degraded += fmt.Sprintf(", but the file holds data up to byte %d past the %d logical bytes that slot records (the damaged slot may have been newer)", end-h.PayloadOff, h.Size)
		}
		if !allowDegraded {
			keys.destroy()
			f.Close()
			return nil, fmt.Errorf("open %s: %w: %s; it is served read-only until `vmcryptd vm check --repair`", path, ErrDegraded, health.Degraded)
		}
	}
	st, err := f.Stat()
	if err != nil {
		keys.destroy()
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if st.Size() < h.MinBackingSize() {
		keys.destroy()
		f.Close()
		return nil, fmt.Errorf("open %s: %w: %d bytes on disk, header needs %d for %d logical bytes", path, ErrTruncated, st.Size(), h.MinBackingSize(), h.Size)
	}
	c, err := newContainer(f, path, keys, *h, impl)
	if err != nil {
		f.Close()
		return nil, err
	}
	c.health = health
	if !readOnly && health.Degraded == "" && st.Size() > h.MinBackingSize() {
		// Units past what the header covers are leftovers: a shrink
		// whose cut a crash prevented (growing again would bring the old
		// data back instead of zeros), or growth that was never synced.
		err := f.Truncate(h.MinBackingSize())
		if err == nil {
			err = unix.Fdatasync(int(f.Fd()))
		}
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("open %s: cut units past the header's size: %w", path, err)
		}
	}
	if health.Interrupted && !readOnly {
		// The newer slot was written after the data it covers was made
		// durable: mirroring it now restores the redundancy a killed
		// header update took away.
		c.hdrMu.Lock()
		err = c.writeHeaderLocked()
		c.hdrMu.Unlock()
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("open %s: mirror header slots: %w", path, err)
		}
	}
	return c, nil
}

// ErrDegraded is returned for a container with one damaged header slot
// (FORMAT.md 3.1) where only a healthy one will do.
var ErrDegraded = errors.New("container degraded: one header slot is damaged")

// dataBeyond reports whether the backing file holds data (not holes) at
// or past off, and where the file ends if so.
func dataBeyond(f *os.File, off int64) (int64, bool) {
	st, err := f.Stat()
	if err != nil || st.Size() <= off {
		return 0, false
	}
	if _, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA); err != nil {
		return 0, false // ENXIO: only holes past off
	}
	return st.Size(), true
}

func newContainer(f *os.File, path string, keys *containerKeys, h Header, impl xts.Impl) (*Container, error) {
	key, err := keys.fileXTSKey(h.FileID)
	if err != nil {
		keys.destroy()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if impl == "" {
		if impl, err = ChooseImpl(); err != nil {
			clear(key)
			keys.destroy()
			return nil, err
		}
	}
	c, err := newXTS(key, h.UnitSize, impl)
	clear(key)
	if err != nil {
		keys.destroy()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &Container{f: f, path: path, keys: keys, xts: c, unit: int64(h.UnitSize), payloadOff: h.PayloadOff, hdr: h}, nil
}

// Path is the backing file's path.
func (c *Container) Path() string { return c.path }

// Header returns a copy of the current header.
func (c *Container) Header() Header {
	c.hdrMu.Lock()
	defer c.hdrMu.Unlock()
	return c.hdr
}

// Health says what the reader concluded about the two header slots at
// open (FORMAT.md 3.1); a header update since then mirrors them again.
func (c *Container) Health() HeaderHealth {
	c.hdrMu.Lock()
	defer c.hdrMu.Unlock()
	return c.health
}

// Size is the logical (plaintext) size.
func (c *Container) Size() int64 {
	c.hdrMu.Lock()
	defer c.hdrMu.Unlock()
	return c.hdr.Size
}

// File exposes the backing file for SEEK_DATA/SEEK_HOLE and fallocate.
func (c *Container) File() *os.File { return c.f }

// writeHeaderLocked is the header update of FORMAT.md 3.1: the header
// with the next sequence number goes to slot 0, is made durable, then
// goes to slot 1 and is made durable. At rest both slots are equal, so
// one damaged slot never leaves the reader only an older, smaller
// header; a crash between the two writes leaves the newer header in
// slot 0 and the older one, still whole, in slot 1. The caller has made
// the data this header covers durable and holds hdrMu.
func (c *Container) writeHeaderLocked() error {
	if c.closed {
		return errors.New("container closed")
	}
	if c.health.Degraded != "" {
		return fmt.Errorf("%w: %s", ErrDegraded, c.health.Degraded)
	}
	if c.hdr.Seq == math.MaxUint64 {
		return errors.New("header sequence number exhausted")
	}
	next := c.hdr
	next.Seq++
	for slot := 0; slot < 2; slot++ {
		next.slot = slot
		b, err := marshalSlot(&next, slot, c.keys.macKey.Bytes())
		if err != nil {
			return err
		}
		// Once a slot may hold next.Seq, it is never written again with
		// other fields: a retry after a failed write takes the number
		// after it (two slots with one number must be equal).
		c.hdr.Seq = next.Seq
		if _, err := c.f.WriteAt(b, int64(slot*slotSize)); err != nil {
			return fmt.Errorf("write header slot %d: %w", slot, err)
		}
		if err := unix.Fdatasync(int(c.f.Fd())); err != nil {
			return fmt.Errorf("sync header slot %d: %w", slot, err)
		}
	}
	c.hdr = next
	c.hdrDirty = false
	c.health = HeaderHealth{}
	return nil
}

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
		zero := i < nUnits && isZero(buf[i*unit:(i+1)*unit])
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

func isZero(b []byte) bool {
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
			if !isZero(buf) { // a hole stays a hole
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

// Close writes a pending header, closes the file and zeroes the keys.
func (c *Container) Close() error {
	c.hdrMu.Lock()
	if c.closed {
		c.hdrMu.Unlock()
		return nil
	}
	var err error
	if c.hdrDirty {
		// Data before the size that covers it (see WriteAt).
		if err = c.syncDataLocked(); err == nil {
			err = c.writeHeaderLocked()
		}
	}
	c.closed = true
	c.hdrMu.Unlock()
	c.xts.Close()
	c.keys.destroy()
	if cerr := c.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", c.path, cerr)
	}
	return err
}

// newXTS is the one place the engine builds an XTS cipher from raw key
// bytes (the per-file derived key).
func newXTS(key []byte, unit int, impl xts.Impl) (*xts.Cipher, error) {
	return xts.New(key, unit, impl)
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

package container

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/xts"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
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
	Binding  keys.Binding
	UnitSize int // 0 means DefaultUnitSize
	Impl     xts.Impl
	Perm     os.FileMode // 0 means 0600
	// EmbeddedKeySafe, when set, is stored in the header's keySafe area
	// (FORMAT.md 3.4) for containers whose key has no text file to live in.
	EmbeddedKeySafe string

	FileID *[16]byte // fixed file id, for the FORMAT.md vectors only
}

// CreateContainer creates path, which must not exist, as an empty
// container.
func CreateContainer(path string, dek *keys.DEK, opts CreateOptions) (*Container, error) {
	unit := opts.UnitSize
	if unit == 0 {
		unit = DefaultUnitSize
	}
	if !ValidUnitSize(unit) {
		return nil, fmt.Errorf("create %s: data unit size %d (want 512, 1024, 2048 or 4096)", path, unit)
	}
	if _, ok := kindNames[opts.Kind]; !ok {
		return nil, fmt.Errorf("create %s: unknown kind %d", path, opts.Kind)
	}
	perm := opts.Perm
	if perm == 0 {
		perm = 0o600
	}
	keys, err := DeriveContainerKeys(dek)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	h := Header{Kind: opts.Kind, UnitSize: unit, PayloadOff: HeaderSize, Binding: opts.Binding, Fingerprint: keys.Fingerprint}
	if opts.FileID != nil {
		h.FileID = *opts.FileID
	} else if _, err := rand.Read(h.FileID[:]); err != nil {
		keys.Destroy()
		return nil, fmt.Errorf("create %s: crypto/rand: %w", path, err)
	}
	// O_EXCL|O_NOFOLLOW: never write through a symlink or over a file
	// someone planted at the name; callers remove their own leftovers.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		keys.Destroy()
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	if err := f.Chmod(perm); err != nil { // by fd, and not reduced by umask
		f.Close()
		os.Remove(path)
		keys.Destroy()
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
			b, err := MarshalKSCopy(opts.EmbeddedKeySafe, 1)
			if err == nil {
				_, err = f.WriteAt(b, int64(KsAreaOff+i*KsCopySize))
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
func OpenContainer(path string, dek *keys.DEK, readOnly bool, impl xts.Impl) (*Container, error) {
	return openContainer(path, dek, readOnly, false, impl)
}

// OpenContainerDegraded opens a container read-only and also accepts a
// degraded one (Health says so): for readers that serve what the
// surviving slot records, such as a view's read-only open and `vm check`.
func OpenContainerDegraded(path string, dek *keys.DEK, impl xts.Impl) (*Container, error) {
	return openContainer(path, dek, true, true, impl)
}

func openContainer(path string, dek *keys.DEK, readOnly, allowDegraded bool, impl xts.Impl) (*Container, error) {
	f, err := safeopen.Open(path, OpenFlag(readOnly))
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return OpenContainerFile(f, path, dek, allowDegraded, impl)
}

func OpenFlag(readOnly bool) int {
	if readOnly {
		return os.O_RDONLY
	}
	return os.O_RDWR
}

// OpenContainerFile opens the container on the already open file f (named
// path in errors), which it owns from here on: closed on every error, kept
// by the Container otherwise. The view decides on a file and serves the
// same descriptor (Datastore.Open), so a rename between the two cannot
// swap what it serves.
func OpenContainerFile(f *os.File, path string, dek *keys.DEK, allowDegraded bool, impl xts.Impl) (*Container, error) {
	readOnly := false
	if fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0); err == nil {
		readOnly = fl&unix.O_ACCMODE == unix.O_RDONLY
	}
	region := make([]byte, 2*SlotSize)
	if n, err := f.ReadAt(region, 0); n < len(region) {
		f.Close()
		if err == nil || err == io.EOF {
			return nil, fmt.Errorf("open %s: %w (file is %d bytes)", path, ErrNotContainer, n)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	keys, err := DeriveContainerKeys(dek)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	h, health, err := VerifyHeader(region, keys)
	if err != nil {
		keys.Destroy()
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if health.Degraded != "" {
		if end, ok := dataBeyond(f, h.MinBackingSize()); ok {
			health.Degraded += fmt.Sprintf(", but the file holds data up to byte %d past the %d logical bytes that slot records (the damaged slot may have been newer)", end-h.PayloadOff, h.Size)
		}
		if !allowDegraded {
			keys.Destroy()
			f.Close()
			return nil, fmt.Errorf("open %s: %w: %s; it is served read-only until `vmcryptd vm check --repair`", path, ErrDegraded, health.Degraded)
		}
	}
	st, err := f.Stat()
	if err != nil {
		keys.Destroy()
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if st.Size() < h.MinBackingSize() {
		keys.Destroy()
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
	key, err := keys.FileXTSKey(h.FileID)
	if err != nil {
		keys.Destroy()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if impl == "" {
		if impl, err = ChooseImpl(); err != nil {
			clear(key)
			keys.Destroy()
			return nil, err
		}
	}
	c, err := NewXTS(key, h.UnitSize, impl)
	clear(key)
	if err != nil {
		keys.Destroy()
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
		next.Slot = slot
		b, err := MarshalSlot(&next, slot, c.keys.MacKey.Bytes())
		if err != nil {
			return err
		}
		// Once a slot may hold next.Seq, it is never written again with
		// other fields: a retry after a failed write takes the number
		// after it (two slots with one number must be equal).
		c.hdr.Seq = next.Seq
		if _, err := c.f.WriteAt(b, int64(slot*SlotSize)); err != nil {
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
	c.keys.Destroy()
	if cerr := c.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", c.path, cerr)
	}
	return err
}

// NewXTS is the one place the engine builds an XTS cipher from raw key
// Bytes (the per-file derived key).
func NewXTS(key []byte, unit int, impl xts.Impl) (*xts.Cipher, error) {
	return xts.New(key, unit, impl)
}

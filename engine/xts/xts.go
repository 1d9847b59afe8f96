// Package xts implements XTS-AES-256 (IEEE 1619-2018 / NIST SP 800-38E) for
// sector (data unit) encryption, with run-time dispatch between AES-NI and
// VAES assembly kernels and a pure-Go reference implementation.
//
// A Cipher encrypts a buffer as a run of consecutive data units of a fixed
// size; unit u is tweaked with u as a 128-bit little-endian number, the same
// convention as dm-crypt's aes-xts-plain64 (with --iv-large-sectors when the
// unit is larger than 512 bytes). A final unit may be shorter than the unit
// size; if its length is not a multiple of 16 it uses IEEE 1619 ciphertext
// stealing.
package xts

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/vmcryptd/vmcryptd/internal/secmem"
)

// Impl names an implementation of the XTS kernels.
type Impl string

// The implementations, fastest family first. Which of them are usable is
// decided at run time from the CPU's features (see Available).
const (
	ImplVAES512 Impl = "vaes512" // VAES + VPCLMULQDQ on 512-bit ZMM registers (AVX-512 F/VL/BW)
	ImplVAES256 Impl = "vaes256" // VAES + VPCLMULQDQ on 256-bit YMM registers (AVX2)
	ImplAESNI   Impl = "aesni"   // AES-NI + PCLMULQDQ, 8 blocks in flight
	ImplGeneric Impl = "generic" // pure Go over crypto/aes; the reference
)

const (
	keySize     = 64
	blockSize   = 16
	maxUnitSize = 1 << 20
)

// Layout of the key region (one page from internal/secmem): the 16-byte round
// key schedules for the SSE and ZMM kernels, and the same schedules with
// every round key broadcast to 32 bytes, so the YMM kernel loads a round key
// with one plain 32-byte load.
const (
	offEK1   = 0    // K1 encryption keys, 15 x 16
	offDK1   = 256  // K1 decryption keys (equivalent inverse cipher), 15 x 16
	offEK2   = 512  // K2 (tweak key) encryption keys, 15 x 16
	offEK1B  = 768  // offEK1 broadcast, 15 x 32
	offDK1B  = 1280 // offDK1 broadcast, 15 x 32
	offEK2B  = 1792 // offEK2 broadcast, 15 x 32
	keyRegSz = 2272
)

var (
	errClosed  = errors.New("xts: use of closed Cipher")
	errOverlap = errors.New("xts: dst and src overlap without being identical (in-place use needs dst and src to be the same slice)")
)

// Cipher is an XTS-AES-256 cipher for data units of a fixed size. It is safe
// for concurrent use by multiple goroutines: all per-call state lives on the
// caller's stack.
type Cipher struct {
	// mu makes Close wait for calls in progress (they hold it shared), so a
	// concurrent Close can never unmap keys under a running kernel. It is
	// sharded: one RWMutex's reader count is a single cache line that every
	// call on every core writes, which at 512-byte units cost more than
	// the cipher when two cores shared a Cipher.
	mu       shardedRWMutex
	impl     Impl
	unitSize int
	closed   bool

	// Assembly implementations: the key region (internal/secmem: outside
	// the Go heap, mlock'ed, out of core dumps and forked children), a view
	// of its bytes, and the cleanup that frees it if the Cipher is dropped
	// without Close.
	keyBuf  *secmem.Buffer
	keys    []byte
	cleanup runtime.Cleanup

	// Generic implementation: crypto/aes blocks for K1 and K2. Their round
	// keys live on the Go heap, inside crypto/aes, and cannot be wiped; use an
	// assembly implementation where that matters.
	b1, b2 cipher.Block
}

// New returns a Cipher for the 64-byte XTS key (K1 = key[:32] encrypts the
// data, K2 = key[32:] the tweaks) and the given data unit size, a multiple
// of 16 between 16 bytes and 1 MiB. impl must be one of Available(); "" picks
// the best available implementation. New does not retain key.
func New(key []byte, unitSize int, impl Impl) (*Cipher, error) {
	if len(key) != keySize {
		return nil, fmt.Errorf("xts: key must be %d bytes (XTS-AES-256), got %d", keySize, len(key))
	}
	if subtle.ConstantTimeCompare(key[:32], key[32:]) == 1 {
		return nil, errors.New("xts: key halves are equal (IEEE 1619 forbids it)")
	}
	if unitSize < blockSize || unitSize > maxUnitSize || unitSize%blockSize != 0 {
		return nil, fmt.Errorf("xts: data unit size must be a multiple of 16 between 16 and %d bytes, got %d", maxUnitSize, unitSize)
	}
	impl, err := Choose(string(impl))
	if err != nil {
		return nil, err
	}
	c := &Cipher{impl: impl, unitSize: unitSize}
	if impl == ImplGeneric {
		// aes.NewCipher cannot fail for a 32-byte key.
		c.b1, _ = aes.NewCipher(key[:32])
		c.b2, _ = aes.NewCipher(key[32:])
		return c, nil
	}
	keyBuf, err := secmem.Alloc(keyRegSz)
	if err != nil {
		return nil, fmt.Errorf("xts: key schedule: %w", err)
	}
	keys := keyBuf.Bytes()
	expandKey256(keys[offEK1:], key[:32])
	decryptionKeys(keys[offDK1:], keys[offEK1:])
	expandKey256(keys[offEK2:], key[32:])
	broadcast256(keys[offEK1B:], keys[offEK1:offEK1+scheduleSz])
	broadcast256(keys[offDK1B:], keys[offDK1:offDK1+scheduleSz])
	broadcast256(keys[offEK2B:], keys[offEK2:offEK2+scheduleSz])
	c.keyBuf, c.keys = keyBuf, keys
	// A Cipher that becomes unreachable without Close still gets its keys
	// wiped and unmapped. The cleanup holds only the region, not c.
	c.cleanup = runtime.AddCleanup(c, freeKeys, keyBuf)
	return c, nil
}

// freeKeys zeroes, unlocks and unmaps a key region. An munmap error can
// only mean a corrupted mapping; the bytes are zeroed before it is tried.
func freeKeys(b *secmem.Buffer) { _ = b.Free() }

// Locked reports whether the key schedules are locked in RAM (mlock may
// fail under a small RLIMIT_MEMLOCK; the cipher then works the same but its
// keys may be swapped). The generic implementation keeps them on the Go
// heap and reports false.
func (c *Cipher) Locked() bool {
	i := c.mu.rlock()
	defer c.mu.runlock(i)
	return c.keyBuf.Locked()
}

// UnitSize returns the data unit size in bytes.
func (c *Cipher) UnitSize() int { return c.unitSize }

// Impl returns the implementation in use.
func (c *Cipher) Impl() Impl { return c.impl }

// Close wipes and releases the key schedules. It waits for calls in
// progress; later calls return an error. Close is idempotent.
func (c *Cipher) Close() {
	c.mu.lock()
	defer c.mu.unlock()
	if c.closed {
		return
	}
	c.closed = true
	if c.keys != nil {
		c.cleanup.Stop()
		freeKeys(c.keyBuf)
		c.keyBuf, c.keys = nil, nil
	}
	c.b1, c.b2 = nil, nil
}

// Encrypt encrypts src into dst, which must have the same length (dst may
// be src itself, but must not otherwise overlap it). src is a run of data
// units of UnitSize bytes numbered from firstUnit; the last may be shorter
// but not below 16 bytes. Unit numbers continue past 2^64-1 as 128-bit
// numbers.
func (c *Cipher) Encrypt(dst, src []byte, firstUnit uint64) error {
	return c.crypt(dst, src, firstUnit, 0, true)
}

// Decrypt is the inverse of Encrypt, with the same rules.
func (c *Cipher) Decrypt(dst, src []byte, firstUnit uint64) error {
	return c.crypt(dst, src, firstUnit, 0, false)
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

func (c *Cipher) check(dst, src []byte) error {
	if len(dst) != len(src) {
		return fmt.Errorf("xts: dst and src lengths differ (%d and %d bytes)", len(dst), len(src))
	}
	if len(src) < blockSize {
		return fmt.Errorf("xts: input of %d bytes is shorter than one 16-byte block", len(src))
	}
	if r := len(src) % c.unitSize; r != 0 && r < blockSize {
		return fmt.Errorf("xts: final data unit of %d bytes is shorter than one 16-byte block", r)
	}
	d, s, n := uintptrOf(dst), uintptrOf(src), uintptr(len(src))
	if d != s && d < s+n && s < d+n {
		return errOverlap
	}
	return nil
}

// crypt runs the whole request with the first unit number hi:lo (128 bits;
// the public API only reaches hi = 0, tests use the full range).
func (c *Cipher) crypt(dst, src []byte, lo, hi uint64, enc bool) error {
	if err := c.check(dst, src); err != nil {
		return err
	}
	shard := c.mu.rlock()
	if c.closed {
		c.mu.runlock(shard)
		return errClosed
	}
	if c.impl == ImplGeneric {
		c.cryptGeneric(dst, src, lo, hi, enc)
	} else {
		c.cryptAsm(dst, src, lo, hi, enc)
	}
	c.mu.runlock(shard)
	return nil
}

// cryptAsm drives the assembly kernels: all whole units go to one kernel
// call, which derives every unit's tweak itself; a final short unit goes
// through cryptTailAsm.
func (c *Cipher) cryptAsm(dst, src []byte, lo, hi uint64, enc bool) {
	us := c.unitSize
	full := len(src) / us
	if full > 0 {
		c.xtsUnits(enc, &dst[0], &src[0], lo, hi, full, us)
	}
	if off := full * us; off < len(src) {
		// Unit number of the tail: hi:lo + full, in 128 bits.
		nlo := lo + uint64(full)
		if nlo < lo {
			hi++
		}
		c.cryptTailAsm(dst[off:], src[off:], nlo, hi, enc)
	}
}

// cryptTailAsm handles a final unit shorter than the unit size (>= 16 bytes).
//
// Ciphertext stealing (IEEE 1619 §5.3.2) is done here in Go rather than in
// every kernel: it touches only the last two blocks of the last unit of a
// request, which in this project means odd-sized files, so its speed does
// not matter, while six more assembly paths would. The kernels are reused as
// single-block XTS primitives with explicit tweaks.
func (c *Cipher) cryptTailAsm(dst, src []byte, lo, hi uint64, enc bool) {
	m, r := len(src)/blockSize, len(src)%blockSize
	if r == 0 {
		c.xtsUnits(enc, &dst[0], &src[0], lo, hi, 1, len(src))
		return
	}
	if m > 1 {
		c.xtsUnits(enc, &dst[0], &src[0], lo, hi, 1, (m-1)*blockSize)
	}
	// tw holds E_K2(unit), then the tweaks of the last full block (m-1) and
	// of the stolen block (m).
	var tw [3 * blockSize]byte
	binary.LittleEndian.PutUint64(tw[0:], lo)
	binary.LittleEndian.PutUint64(tw[8:], hi)
	c.ecbTweaks(&tw[0], 1)
	t0, t1 := binary.LittleEndian.Uint64(tw[0:]), binary.LittleEndian.Uint64(tw[8:])
	t0, t1 = mulXPow(t0, t1, m-1)
	binary.LittleEndian.PutUint64(tw[16:], t0)
	binary.LittleEndian.PutUint64(tw[24:], t1)
	t0, t1 = mulX(t0, t1)
	binary.LittleEndian.PutUint64(tw[32:], t0)
	binary.LittleEndian.PutUint64(tw[40:], t1)
	tPrev, tLast := &tw[16], &tw[32]

	p := (m - 1) * blockSize
	var cc, pp [blockSize]byte
	if enc {
		// CC = XTS(P[m-1], T[m-1]); C[m] = CC[:r]; C[m-1] = XTS(P[m] || CC[r:], T[m]).
		c.xtsExplicit(true, &cc[0], &src[p], tPrev, 1, blockSize)
		copy(pp[:r], src[p+blockSize:]) // read P[m] before dst (maybe == src) is written
		copy(pp[r:], cc[r:])
		copy(dst[p+blockSize:], cc[:r])
		c.xtsExplicit(true, &dst[p], &pp[0], tLast, 1, blockSize)
	} else {
		// PP = XTS⁻¹(C[m-1], T[m]); P[m] = PP[:r]; P[m-1] = XTS⁻¹(C[m] || PP[r:], T[m-1]).
		c.xtsExplicit(false, &pp[0], &src[p], tLast, 1, blockSize)
		copy(cc[:r], src[p+blockSize:])
		copy(cc[r:], pp[r:])
		copy(dst[p+blockSize:], pp[:r])
		c.xtsExplicit(false, &dst[p], &cc[0], tPrev, 1, blockSize)
	}
	// Encrypted tweaks and block remnants: do not leave them on the stack.
	clear(tw[:])
	clear(cc[:])
	clear(pp[:])
}

// shardedRWMutex is a reader-biased lock: readers take one of several
// RWMutexes, each on its own cache line, chosen by the P (the scheduler's
// per-core slot) the caller runs on, so goroutines running at the same
// time on different cores never share one (for GOMAXPROCS up to
// rwShards); a writer takes them all. An earlier choice by stack address
// put the two goroutines of a probe on one shard in 6 of 10 rounds, and with
// 512-byte units that shared reader count halved two-core throughput
// (issue 14: 6.6 to 19.4 GB/s between runs).
type shardedRWMutex struct {
	// The first cache line of the Cipher is left alone: a shard there
	// (shard 0, which P 0 always takes) measured 7-9 GB/s for two
	// 512-byte threads whatever the other thread's shard, against 18-20
	// for any two other shards. Go 1.22+ puts an 8-byte malloc header
	// (the type pointer) at the start of such objects, so that line is
	// not ours alone.
	_      [64]byte
	shards [rwShards]struct {
		sync.RWMutex
		_ [64 - 24]byte // one cache line each
	}
}

const rwShards = 32

// procPin and procUnpin are the runtime's, as sync.Pool uses them: the
// caller's P id, with preemption held off until procUnpin. The runtime
// keeps them for linkname users (see its "hall of shame" notes).
//
//go:linkname procPin runtime.procPin
func procPin() int

//go:linkname procUnpin runtime.procUnpin
func procUnpin()

// shardFor maps a P id to a shard.
func shardFor(p int) int { return p % rwShards }

// shardIndex is the read shard of the caller's P.
func shardIndex() int {
	p := procPin()
	procUnpin()
	return shardFor(p)
}

func (m *shardedRWMutex) rlock() int {
	// The goroutine may move to another P before runlock: the index is
	// returned so runlock releases the shard it took. Which shard a
	// reader takes never matters for correctness, only for contention.
	i := shardIndex()
	m.shards[i].RLock()
	return i
}

func (m *shardedRWMutex) runlock(i int) { m.shards[i].RUnlock() }

func (m *shardedRWMutex) lock() {
	for i := range m.shards {
		m.shards[i].Lock()
	}
}

func (m *shardedRWMutex) unlock() {
	for i := range m.shards {
		m.shards[i].Unlock()
	}
}

package keys

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/vmcryptd/vmcryptd/internal/secmem"
)

// Sizes of the keys in the hierarchy.
const (
	KEKSize = 32 // AES-256 key-encryption key, owned by the key server
	DEKSize = 64 // XTS-AES-256 data-encryption key: two AES-256 halves
)

// KeyRef names a KEK: the key provider (as configured in vmcryptd) and the
// key's id on that provider's KMIP servers. It is all a config file holds.
type KeyRef struct {
	Provider string
	KeyID    string
}

func (r KeyRef) String() string { return r.Provider + "/" + r.KeyID }

// KEK is a key-encryption key fetched from a key server, held only in
// locked memory.
type KEK struct {
	Ref KeyRef
	// mu is held shared while the key is used and exclusively by Destroy,
	// so a key dropped by one goroutine (a rekey, host mode off) is never
	// freed under another that is wrapping with it.
	mu  sync.RWMutex
	buf *secmem.Buffer
	// state is the KMIP state at fetch time ("" or KEKActive: may wrap;
	// see kekUse). Set before the KEK is shared, never changed.
	state string
}

// with runs fn on the key bytes, or fails if the key was destroyed.
func (k *KEK) With(fn func(key []byte) error) error {
	if k == nil {
		return errors.New("kek not loaded")
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.buf.Len() != KEKSize {
		return fmt.Errorf("kek %s: destroyed", k.Ref)
	}
	return fn(k.buf.Bytes())
}

// NewKEK takes ownership of raw (it is cleared) and returns a KEK in
// locked memory.
func NewKEK(ref KeyRef, raw []byte) (*KEK, error) {
	if len(raw) != KEKSize {
		n := len(raw)
		clear(raw)
		return nil, fmt.Errorf("kek %s: want %d bytes (AES-256), key server returned %d", ref, KEKSize, n)
	}
	buf, err := secmem.FromBytes(raw)
	if err != nil {
		return nil, fmt.Errorf("kek %s: %w", ref, err)
	}
	return &KEK{Ref: ref, buf: buf}, nil
}

// MemoryLocked reports whether the key's memory is mlock'ed.
func (k *KEK) MemoryLocked() bool {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.buf.Locked()
}

// Destroy zeroes and frees the key, waiting for current users. Safe to
// call more than once.
func (k *KEK) Destroy() {
	if k != nil {
		k.mu.Lock()
		_ = k.buf.Free()
		k.mu.Unlock()
	}
}

// DEK is a data-encryption key (XTS-AES-256) held in locked memory.
type DEK struct {
	mu  sync.RWMutex // shared while used, exclusive in Destroy (see KEK)
	buf *secmem.Buffer
}

// NewDEK generates a fresh DEK from crypto/rand. IEEE 1619 forbids equal
// halves; the chance is 2^-256, but the check is cheap and makes the
// invariant unconditional.
func NewDEK() (*DEK, error) {
	buf, err := secmem.Alloc(DEKSize)
	if err != nil {
		return nil, fmt.Errorf("new dek: %w", err)
	}
	for {
		if _, err := rand.Read(buf.Bytes()); err != nil {
			_ = buf.Free()
			return nil, fmt.Errorf("new dek: crypto/rand: %w", err)
		}
		if !EqualHalves(buf.Bytes()) {
			return &DEK{buf: buf}, nil
		}
	}
}

// DEKFromBytes takes ownership of raw (it is cleared).
func DEKFromBytes(raw []byte) (*DEK, error) {
	if len(raw) != DEKSize {
		clear(raw)
		return nil, fmt.Errorf("dek: want %d bytes, got %d", DEKSize, len(raw))
	}
	if EqualHalves(raw) {
		clear(raw)
		return nil, errors.New("dek: key halves are equal (IEEE 1619 forbids it)")
	}
	buf, err := secmem.FromBytes(raw)
	if err != nil {
		return nil, fmt.Errorf("dek: %w", err)
	}
	return &DEK{buf: buf}, nil
}

func EqualHalves(k []byte) bool {
	return subtle.ConstantTimeCompare(k[:len(k)/2], k[len(k)/2:]) == 1
}

// Destroy zeroes and frees the key, waiting for current users. Safe to
// call more than once.
func (d *DEK) Destroy() {
	if d != nil {
		d.mu.Lock()
		_ = d.buf.Free()
		d.mu.Unlock()
	}
}

// with runs fn on the key bytes, or fails if the key was destroyed: a
// destroyed key must never turn into an empty (public) key.
func (d *DEK) With(fn func(key []byte) error) error {
	if d == nil {
		return errors.New("dek not loaded")
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.buf.Len() != DEKSize {
		return errors.New("dek: destroyed")
	}
	return fn(d.buf.Bytes())
}

// Bytes is for tests only: it does not hold the lock.
func (d *DEK) Bytes() []byte { return d.buf.Bytes() }

// Purpose says what a DEK protects; it is bound into the wrapping so a
// wrapped disk key cannot be presented as a VM key or vice versa.
type Purpose string

const (
	PurposeVM       Purpose = "vm"       // per-VM key: nvram, vswp, vmsn, vmss, vmem, encryption.data
	PurposeDisk     Purpose = "disk"     // per-virtual-disk key: the disk's extents
	PurposeCoreDump Purpose = "coredump" // per-core-dump key wrapped by the host key
)

// Binding is the identity a wrapped DEK is bound to. Unwrapping with any
// other binding fails, so a keySafe copied onto another VM or disk is
// refused rather than silently accepted.
type Binding struct {
	Purpose Purpose
	OwnerID string // VM id, disk id or core-dump file id
}

// Locked-data layout (docs/FORMAT.md, "Wrapped DEK"):
//
//	version(1) = 0x01 | salt(32) | AES-256-GCM(DEK)(64) | tag(16)
const (
	wrapVersion   = 0x01
	wrapSaltSize  = 32
	LockedDataLen = 1 + wrapSaltSize + DEKSize + 16
	// WrapSchemeName is the MAC-name field of every KeyLocator pair we
	// write; it names the whole scheme, which authenticates as well as
	// encrypts.
	WrapSchemeName = "VMCRYPTD-V1-HKDF-SHA-256-AES-256-GCM"
	wrapInfo       = "vmcryptd v1 dek-wrap"
	wrapADLabel    = "vmcryptd v1 wrapped-dek"
)

// WrapDEK encrypts dek under kek, bound to b and to kek's reference.
func WrapDEK(kek *KEK, dek *DEK, b Binding) ([]byte, error) {
	var salt [wrapSaltSize]byte
	if _, err := rand.Read(salt[:]); err != nil {
		return nil, fmt.Errorf("wrap dek: crypto/rand: %w", err)
	}
	return WrapDEKWithSalt(kek, dek, b, salt[:])
}

func WrapDEKWithSalt(kek *KEK, dek *DEK, b Binding, salt []byte) ([]byte, error) {
	if err := kek.MayWrap(); err != nil {
		return nil, err
	}
	if err := checkADFields(kek, b); err != nil {
		return nil, err
	}
	aead, err := wrapAEAD(kek, salt)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 1+wrapSaltSize, LockedDataLen)
	out[0] = wrapVersion
	copy(out[1:], salt)
	// The key is used once (a fresh salt per wrap), so a fixed nonce is
	// safe and leaves nothing to get wrong.
	err = dek.With(func(key []byte) error {
		out = aead.Seal(out, make([]byte, aead.NonceSize()), key, WrapAD(kek.Ref, b))
		return nil
	})
	return out, err
}

// UnwrapDEK reverses WrapDEK. A wrong KEK, a different binding or any
// modified byte all fail the same authenticated check.
func UnwrapDEK(kek *KEK, locked []byte, b Binding) (*DEK, error) {
	if len(locked) != LockedDataLen {
		return nil, fmt.Errorf("unwrap dek: locked data is %d bytes, want %d", len(locked), LockedDataLen)
	}
	if locked[0] != wrapVersion {
		return nil, fmt.Errorf("unwrap dek: unknown wrap version %d", locked[0])
	}
	if err := checkADFields(kek, b); err != nil {
		return nil, err
	}
	aead, err := wrapAEAD(kek, locked[1:1+wrapSaltSize])
	if err != nil {
		return nil, err
	}
	raw, err := aead.Open(nil, make([]byte, aead.NonceSize()), locked[1+wrapSaltSize:], WrapAD(kek.Ref, b))
	if err != nil {
		return nil, fmt.Errorf("unwrap dek for %s %q with kek %s: authentication failed (wrong key, or keySafe belongs to another %s)", b.Purpose, b.OwnerID, kek.Ref, b.Purpose)
	}
	return DEKFromBytes(raw)
}

func wrapAEAD(kek *KEK, salt []byte) (cipher.AEAD, error) {
	var wk []byte
	err := kek.With(func(key []byte) (err error) {
		wk, err = hkdf.Key(sha256.New, key, salt, wrapInfo, 32)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("wrap dek: %w", err)
	}
	defer clear(wk)
	block, err := aes.NewCipher(wk)
	if err != nil {
		return nil, fmt.Errorf("wrap dek: %w", err)
	}
	return cipher.NewGCM(block)
}

// maxADField bounds each associated-data field so its u16 length prefix
// can never wrap.
const maxADField = 1024

func checkADFields(kek *KEK, b Binding) error {
	if kek == nil {
		return errors.New("wrap dek: kek not loaded")
	}
	for _, f := range []string{string(b.Purpose), b.OwnerID, kek.Ref.Provider, kek.Ref.KeyID} {
		if len(f) > maxADField {
			return fmt.Errorf("wrap dek: binding field of %d bytes exceeds %d", len(f), maxADField)
		}
	}
	if b.Purpose == "" || b.OwnerID == "" {
		return errors.New("wrap dek: binding needs a purpose and an owner id")
	}
	return nil
}

// WrapAD is the associated data: a label carrying the format version, then
// purpose, owner id, provider and key id, each as u16-BE length + bytes, so
// no two distinct bindings encode alike.
func WrapAD(ref KeyRef, b Binding) []byte {
	ad := []byte(wrapADLabel)
	for _, f := range []string{string(b.Purpose), b.OwnerID, ref.Provider, ref.KeyID} {
		ad = binary.BigEndian.AppendUint16(ad, uint16(len(f)))
		ad = append(ad, f...)
	}
	return ad
}

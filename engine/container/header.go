package container

import (
	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
	"github.com/vmcryptd/vmcryptd/internal/secmem"
)

// Container header constants; docs/FORMAT.md ("Encrypted container") is
// the normative description and these must match it.
const (
	ContainerMagic   = "VMCRYPTD"
	ContainerVersion = 1
	HeaderSize       = 4096 // payload starts here, so units stay O_DIRECT-aligned
	SlotSize         = 512
	SlotMACOffset    = SlotSize - sha256.Size
	maxOwnerID       = 64
	// DefaultUnitSize is the data unit (XTS sector) of new containers.
	DefaultUnitSize = 4096
)

// Kind says what a container holds. It is authenticated in the header, so
// swapping two files of one VM (same key) is still detected.
type Kind uint8

const (
	KindExtent   Kind = 1 // virtual-disk extent (flat or sparse)
	KindNVRAM    Kind = 2
	KindVSWP     Kind = 3
	KindVMSN     Kind = 4
	KindVMSS     Kind = 5
	KindVMEM     Kind = 6
	KindCoreDump Kind = 7
	KindOther    Kind = 8 // any other file created inside an encrypted VM
)

var kindNames = map[Kind]string{
	KindExtent: "extent", KindNVRAM: "nvram", KindVSWP: "vswp", KindVMSN: "vmsn",
	KindVMSS: "vmss", KindVMEM: "vmem", KindCoreDump: "coredump", KindOther: "other",
}

func (k Kind) String() string {
	if s, ok := kindNames[k]; ok {
		return s
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

var purposeCodes = map[keys.Purpose]uint8{keys.PurposeVM: 1, keys.PurposeDisk: 2, keys.PurposeCoreDump: 3}

// Header is the authenticated metadata of a container (one slot's worth).
type Header struct {
	Kind        Kind
	Seq         uint64 // higher wins between the two slots
	Size        int64  // logical (plaintext) size in bytes
	UnitSize    int
	PayloadOff  int64
	FileID      [16]byte
	Fingerprint [16]byte     // identifies the DEK without revealing it
	Binding     keys.Binding // which DEK: the VM's, a disk's, or a core dump's
	Slot        int
}

// Units is the number of data units the payload holds.
func (h *Header) Units() int64 {
	return (h.Size + int64(h.UnitSize) - 1) / int64(h.UnitSize)
}

// MinBackingSize is the smallest backing file that holds every unit.
func (h *Header) MinBackingSize() int64 {
	return h.PayloadOff + h.Units()*int64(h.UnitSize)
}

// Sentinel errors, matched with errors.Is; messages name the file.
var (
	ErrNotContainer = errors.New("not a vmcryptd container")
	ErrWrongKey     = errors.New("encrypted with a different key")
	ErrTampered     = errors.New("header authentication failed (tampered or corrupt)")
	ErrTruncated    = errors.New("container truncated")
)

// containerKeys are the per-DEK derived keys (docs/FORMAT.md "Key
// derivation"). Deriving rather than using the DEK directly lets one VM
// key serve many files without two files ever sharing XTS keystream
// positions (the XTS key is per file id).
type containerKeys struct {
	Prk         *secmem.Buffer // as powerful as the DEK: locked memory
	MacKey      *secmem.Buffer
	Fingerprint [16]byte
}

const kdfSalt = "vmcryptd v1 container"

func DeriveContainerKeys(dek *keys.DEK) (*containerKeys, error) {
	var prk []byte
	err := dek.With(func(key []byte) (err error) {
		prk, err = hkdf.Extract(sha256.New, key, []byte(kdfSalt))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("derive container keys: %w", err)
	}
	mac, err := hkdf.Expand(sha256.New, prk, "header-mac", 32)
	if err != nil {
		clear(prk)
		return nil, fmt.Errorf("hkdf expand: %w", err)
	}
	fp, err := hkdf.Expand(sha256.New, prk, "fingerprint", 16)
	if err != nil {
		clear(prk)
		clear(mac)
		return nil, fmt.Errorf("hkdf expand: %w", err)
	}
	k := &containerKeys{}
	copy(k.Fingerprint[:], fp)
	// FromBytes clears the heap copies.
	if k.Prk, err = secmem.FromBytes(prk); err != nil {
		clear(mac)
		return nil, err
	}
	if k.MacKey, err = secmem.FromBytes(mac); err != nil {
		k.Prk.Free()
		return nil, err
	}
	return k, nil
}

// FileXTSKey derives the 64-byte XTS key of one file. The caller clears it.
func (k *containerKeys) FileXTSKey(fileID [16]byte) ([]byte, error) {
	key, err := hkdf.Expand(sha256.New, k.Prk.Bytes(), "xts"+string(fileID[:]), keys.DEKSize)
	if err != nil {
		return nil, fmt.Errorf("hkdf expand: %w", err)
	}
	if keys.EqualHalves(key) {
		clear(key)
		return nil, errors.New("derived XTS key has equal halves")
	}
	return key, nil
}

func (k *containerKeys) Destroy() {
	if k != nil {
		k.Prk.Free()
		k.MacKey.Free()
	}
}

// DEKFingerprint is the 16-byte fingerprint of a DEK as stored in
// container headers and shown by `vmcryptd vm status`.
func DEKFingerprint(dek *keys.DEK) ([16]byte, error) {
	k, err := DeriveContainerKeys(dek)
	if err != nil {
		return [16]byte{}, err
	}
	defer k.Destroy()
	return k.Fingerprint, nil
}

// MarshalSlot encodes h into a 512-byte slot and MACs it.
func MarshalSlot(h *Header, slot int, macKey []byte) ([]byte, error) {
	code, ok := purposeCodes[h.Binding.Purpose]
	if !ok {
		return nil, fmt.Errorf("header: unknown key purpose %q", h.Binding.Purpose)
	}
	if len(h.Binding.OwnerID) == 0 || len(h.Binding.OwnerID) > maxOwnerID {
		return nil, fmt.Errorf("header: owner id must be 1..%d bytes, got %d", maxOwnerID, len(h.Binding.OwnerID))
	}
	if h.Size < 0 {
		return nil, fmt.Errorf("header: negative size %d", h.Size)
	}
	b := make([]byte, SlotSize)
	copy(b[0:8], ContainerMagic)
	binary.LittleEndian.PutUint16(b[8:], ContainerVersion)
	b[10] = byte(slot)
	b[11] = byte(h.Kind)
	// b[12:16] flags: zero in version 1
	binary.LittleEndian.PutUint64(b[16:], h.Seq)
	binary.LittleEndian.PutUint64(b[24:], uint64(h.Size))
	binary.LittleEndian.PutUint32(b[32:], uint32(h.UnitSize))
	binary.LittleEndian.PutUint32(b[36:], uint32(h.PayloadOff))
	copy(b[40:56], h.FileID[:])
	copy(b[56:72], h.Fingerprint[:])
	b[72] = code
	b[73] = byte(len(h.Binding.OwnerID))
	copy(b[74:74+maxOwnerID], h.Binding.OwnerID)
	m := hmac.New(sha256.New, macKey)
	m.Write(b[:SlotMACOffset])
	copy(b[SlotMACOffset:], m.Sum(nil))
	return b, nil
}

// parseSlot decodes a slot without checking its MAC. It validates every
// field so that even an unauthenticated header (inspect, no key) never
// yields nonsense sizes.
func parseSlot(b []byte, slot int) (*Header, error) {
	if len(b) < SlotSize || string(b[0:8]) != ContainerMagic {
		return nil, ErrNotContainer
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != ContainerVersion {
		return nil, fmt.Errorf("unsupported container version %d (this vmcryptd reads %d)", v, ContainerVersion)
	}
	if int(b[10]) != slot {
		return nil, fmt.Errorf("slot %d claims to be slot %d", slot, b[10])
	}
	h := &Header{Slot: slot}
	h.Kind = Kind(b[11])
	if _, ok := kindNames[h.Kind]; !ok {
		return nil, fmt.Errorf("unknown file kind %d", b[11])
	}
	if flags := binary.LittleEndian.Uint32(b[12:]); flags != 0 {
		return nil, fmt.Errorf("unknown header flags %#x", flags)
	}
	h.Seq = binary.LittleEndian.Uint64(b[16:])
	size := binary.LittleEndian.Uint64(b[24:])
	if size > 1<<62 {
		return nil, fmt.Errorf("logical size %d out of range", size)
	}
	h.Size = int64(size)
	h.UnitSize = int(binary.LittleEndian.Uint32(b[32:]))
	if !ValidUnitSize(h.UnitSize) {
		return nil, fmt.Errorf("invalid data unit size %d", h.UnitSize)
	}
	h.PayloadOff = int64(binary.LittleEndian.Uint32(b[36:]))
	if h.PayloadOff != HeaderSize {
		return nil, fmt.Errorf("invalid payload offset %d", h.PayloadOff)
	}
	copy(h.FileID[:], b[40:56])
	copy(h.Fingerprint[:], b[56:72])
	var purpose keys.Purpose
	for p, c := range purposeCodes {
		if c == b[72] {
			purpose = p
		}
	}
	if purpose == "" {
		return nil, fmt.Errorf("unknown key purpose code %d", b[72])
	}
	n := int(b[73])
	if n == 0 || n > maxOwnerID {
		return nil, fmt.Errorf("invalid owner id length %d", n)
	}
	h.Binding = keys.Binding{Purpose: purpose, OwnerID: string(b[74 : 74+n])}
	if !bytes.Equal(b[74+n:74+maxOwnerID], make([]byte, maxOwnerID-n)) || !bytes.Equal(b[74+maxOwnerID:SlotMACOffset], make([]byte, SlotMACOffset-74-maxOwnerID)) {
		return nil, errors.New("reserved header bytes are not zero")
	}
	return h, nil
}

func ValidUnitSize(n int) bool {
	return n == 512 || n == 1024 || n == 2048 || n == 4096
}

func slotMACOK(b []byte, macKey []byte) bool {
	m := hmac.New(sha256.New, macKey)
	m.Write(b[:SlotMACOffset])
	return subtle.ConstantTimeCompare(m.Sum(nil), b[SlotMACOffset:SlotSize]) == 1
}

// PeekHeader reads the header region without a key: it returns the newest
// slot that parses, unauthenticated. Used by inspect and by the engine to
// learn which DEK a file needs before it has one.
func PeekHeader(region []byte) (*Header, error) {
	var best *Header
	var firstErr error
	for slot := 0; slot < 2; slot++ {
		off := slot * SlotSize
		if len(region) < off+SlotSize {
			break
		}
		h, err := parseSlot(region[off:off+SlotSize], slot)
		if err != nil {
			if firstErr == nil || errors.Is(firstErr, ErrNotContainer) {
				firstErr = err
			}
			continue
		}
		if best == nil || h.Seq > best.Seq {
			best = h
		}
	}
	if best == nil {
		if firstErr == nil {
			firstErr = ErrNotContainer
		}
		return nil, firstErr
	}
	return best, nil
}

// slotCheck is what one header slot showed when read with a key.
type slotCheck struct {
	h        *Header // nil: the slot does not parse
	parseErr error
	fpMatch  bool // its fingerprint is the key's
	macOK    bool // its MAC verifies under the key
}

func (s slotCheck) valid() bool { return s.h != nil && s.fpMatch && s.macOK }

func (s slotCheck) why() string {
	switch {
	case s.h == nil:
		return fmt.Sprintf("does not parse (%v)", s.parseErr)
	case !s.fpMatch:
		return "names a different key"
	default:
		return "fails authentication"
	}
}

// HeaderHealth is what the reader concluded about a container's two
// header slots (docs/FORMAT.md 3.1).
type HeaderHealth struct {
	// Degraded is set when exactly one slot verifies: it says which slot
	// is damaged and how. The surviving slot may be older than the lost
	// one, so a degraded container is served read-only, conversions
	// refuse it, and `vmcryptd vm check --repair` mirrors the good slot.
	Degraded string
	// Interrupted: both slots verify but carry different sequence
	// numbers (a header update stopped between its two writes, or the
	// file predates the mirrored protocol). The newer slot is used; the
	// next header update mirrors it.
	Interrupted bool
}

// judgeSlots is the header-slot decision of docs/FORMAT.md 3.1, as a pure
// function of what each slot showed: which slot to use, the container's
// header health, or why the container is refused.
//
//   - both slots verify: they must agree on every field but the sequence
//     number and size (and on those too when the sequence numbers are
//     equal, the normal state at rest); the higher sequence wins;
//   - exactly one verifies: it is used and the container is degraded;
//   - none verifies: ErrWrongKey if no parsable slot names the key,
//     else ErrTampered.
func judgeSlots(s [2]slotCheck) (int, HeaderHealth, error) {
	v0, v1 := s[0].valid(), s[1].valid()
	switch {
	case v0 && v1:
		a, b := *s[0].h, *s[1].h
		a.Slot, b.Slot = 0, 0
		if a.Seq == b.Seq {
			if a != b {
				return 0, HeaderHealth{}, fmt.Errorf("%w: both slots carry sequence %d but differ", ErrTampered, a.Seq)
			}
			return 0, HeaderHealth{}, nil
		}
		a.Seq, b.Seq, a.Size, b.Size = 0, 0, 0, 0
		if a != b {
			return 0, HeaderHealth{}, fmt.Errorf("%w: the two slots describe different files", ErrTampered)
		}
		if s[1].h.Seq > s[0].h.Seq {
			return 1, HeaderHealth{Interrupted: true}, nil
		}
		return 0, HeaderHealth{Interrupted: true}, nil
	case v0 || v1:
		good, bad := 0, 1
		if v1 {
			good, bad = 1, 0
		}
		return good, HeaderHealth{Degraded: fmt.Sprintf("header slot %d %s; slot %d (sequence %d) is used", bad, s[bad].why(), good, s[good].h.Seq)}, nil
	}
	for _, c := range s {
		if c.h != nil && c.fpMatch {
			return 0, HeaderHealth{}, ErrTampered
		}
	}
	return 0, HeaderHealth{}, ErrWrongKey
}

// PeekSlots returns the slots of region that parse, newest first,
// unauthenticated: a caller picking a key tries each, so one damaged
// field in the newer slot leaves the other to name the key (the MAC
// check at open decides).
func PeekSlots(region []byte) []*Header {
	var out []*Header
	for slot := 0; slot < 2; slot++ {
		if len(region) < (slot+1)*SlotSize {
			break
		}
		if h, err := parseSlot(region[slot*SlotSize:(slot+1)*SlotSize], slot); err == nil {
			out = append(out, h)
		}
	}
	if len(out) == 2 && out[1].Seq > out[0].Seq {
		out[0], out[1] = out[1], out[0]
	}
	return out
}

// VerifyHeader authenticates the header region under keys and returns
// the slot to use with the container's header health (judgeSlots).
// Errors distinguish "not ours", "other key" and "tampered".
func VerifyHeader(region []byte, keys *containerKeys) (*Header, HeaderHealth, error) {
	if _, err := PeekHeader(region); err != nil {
		return nil, HeaderHealth{}, err
	}
	var s [2]slotCheck
	for slot := 0; slot < 2; slot++ {
		if len(region) < (slot+1)*SlotSize {
			// A file cut inside its header: the slot is missing.
			s[slot].parseErr = fmt.Errorf("%w: header slot %d cut off (%d bytes)", ErrTruncated, slot, len(region))
			continue
		}
		b := region[slot*SlotSize : (slot+1)*SlotSize]
		h, err := parseSlot(b, slot)
		if err != nil {
			s[slot].parseErr = err
			continue
		}
		s[slot].h = h
		s[slot].fpMatch = subtle.ConstantTimeCompare(h.Fingerprint[:], keys.Fingerprint[:]) == 1
		s[slot].macOK = s[slot].fpMatch && slotMACOK(b, keys.MacKey.Bytes())
	}
	i, health, err := judgeSlots(s)
	if err != nil {
		return nil, HeaderHealth{}, err
	}
	return s[i].h, health, nil
}

// ErrKindMismatch is returned for a container whose authenticated kind
// does not fit its file name.
var ErrKindMismatch = errors.New("container kind does not match the file name")

// ReadHead reads the header region (the first HeaderSize bytes, fewer if
// the file is shorter) of the regular file at path, through the safeopen
// funnel: a symlink, FIFO, socket or device is refused without blocking;
// a missing file is an error wrapping os.ErrNotExist. It is the one
// header probe by path; ReadHeadFrom is the one by descriptor.
func ReadHead(path string) ([]byte, error) {
	f, err := safeopen.Open(path, os.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ReadHeadFrom(f)
}

// ReadHeadFrom reads the first HeaderSize bytes of f (fewer if shorter)
// without moving its offset.
func ReadHeadFrom(f *os.File) ([]byte, error) {
	head := make([]byte, HeaderSize)
	n, err := f.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return head[:n], nil
}

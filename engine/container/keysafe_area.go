package container

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"

	"github.com/vmcryptd/vmcryptd/internal/safeopen"
	"golang.org/x/sys/unix"
)

// Embedded keySafe area (docs/FORMAT.md 3.4): containers whose key has no
// text file to live in (a sparse or stream-optimized disk whose descriptor
// is inside the encrypted extent, a core dump) carry their keySafe in the
// header's reserved region, in two copies so that rewriting it (a shallow
// rekey) can never leave no valid copy.
const (
	KsAreaOff   = 1024
	KsCopySize  = 1536
	ksMagic     = "VMCKSAFE"
	KsHashOff   = KsCopySize - sha256.Size
	ksMaxString = KsHashOff - 18
)

func MarshalKSCopy(ks string, seq uint64) ([]byte, error) {
	if len(ks) > ksMaxString {
		return nil, fmt.Errorf("embedded keySafe of %d bytes exceeds %d", len(ks), ksMaxString)
	}
	b := make([]byte, KsCopySize)
	copy(b, ksMagic)
	binary.LittleEndian.PutUint64(b[8:], seq)
	binary.LittleEndian.PutUint16(b[16:], uint16(len(ks)))
	copy(b[18:], ks)
	sum := sha256.Sum256(b[:KsHashOff])
	copy(b[KsHashOff:], sum[:])
	return b, nil
}

func ParseKSCopy(b []byte) (string, uint64, bool) {
	if len(b) < KsCopySize || string(b[:8]) != ksMagic {
		return "", 0, false
	}
	sum := sha256.Sum256(b[:KsHashOff])
	if !bytes.Equal(sum[:], b[KsHashOff:KsCopySize]) {
		return "", 0, false
	}
	n := int(binary.LittleEndian.Uint16(b[16:]))
	if n > ksMaxString {
		return "", 0, false
	}
	return string(b[18 : 18+n]), binary.LittleEndian.Uint64(b[8:]), true
}

// ReadEmbeddedKeySafe returns the newest valid embedded keySafe from a
// header region (the file's first 4096 bytes), if any.
func ReadEmbeddedKeySafe(region []byte) (ks string, ok bool) {
	var best uint64
	for i := 0; i < 2; i++ {
		off := KsAreaOff + i*KsCopySize
		if len(region) < off+KsCopySize {
			break
		}
		s, seq, valid := ParseKSCopy(region[off : off+KsCopySize])
		if valid && (!ok || seq > best) {
			ks, best, ok = s, seq, true
		}
	}
	return ks, ok
}

// ReadEmbeddedKeySafeFile reads the embedded keySafe of the container at path.
func ReadEmbeddedKeySafeFile(path string) (string, bool, error) {
	f, err := safeopen.Open(path, os.O_RDONLY)
	if err != nil {
		return "", false, err
	}
	defer f.Close()
	region := make([]byte, HeaderSize)
	n, _ := f.ReadAt(region, 0)
	ks, ok := ReadEmbeddedKeySafe(region[:n])
	return ks, ok, nil
}

// WriteEmbeddedKeySafe replaces the embedded keySafe of the container at
// path: it writes the copy that is not the newest, with a higher sequence
// number, and fsyncs. The older copy stays valid until the new one is
// complete.
func WriteEmbeddedKeySafe(path, ks string) error {
	f, err := safeopen.Open(path, os.O_RDWR)
	if err != nil {
		return fmt.Errorf("write keySafe of %s: %w", path, err)
	}
	defer f.Close()
	region := make([]byte, HeaderSize)
	if n, err := f.ReadAt(region, 0); n < HeaderSize {
		return fmt.Errorf("write keySafe of %s: short header: %v", path, err)
	}
	if _, err := PeekHeader(region); err != nil {
		return fmt.Errorf("write keySafe of %s: %w", path, err)
	}
	// Overwrite the copy that is not the newest valid one.
	target, seq, found := 0, uint64(1), false
	var newest uint64
	for i := 0; i < 2; i++ {
		off := KsAreaOff + i*KsCopySize
		if _, s, ok := ParseKSCopy(region[off : off+KsCopySize]); ok && (!found || s > newest) {
			found, newest, target, seq = true, s, 1-i, s+1
		}
	}
	b, err := MarshalKSCopy(ks, seq)
	if err != nil {
		return fmt.Errorf("write keySafe of %s: %w", path, err)
	}
	if _, err := f.WriteAt(b, int64(KsAreaOff+target*KsCopySize)); err != nil {
		return fmt.Errorf("write keySafe of %s: %w", path, err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("write keySafe of %s: fsync: %w", path, err)
	}
	return nil
}

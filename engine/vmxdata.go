package engine

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// The vmx `encryption.data` bundle (docs/FORMAT.md 4.2): sensitive vmx
// lines, moved out of the text file and encrypted under the VM DEK, with
// their original line positions so decryption restores the file exactly.

// sensitiveVMXKey reports whether a vmx key's line moves into the bundle.
func sensitiveVMXKey(key string) bool {
	k := strings.ToLower(key)
	return strings.HasPrefix(k, "guestinfo.") || k == "machine.id" || k == "annotation"
}

// splitLines splits text into lines that keep their terminators.
func splitLines(b []byte) [][]byte {
	var out [][]byte
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			out = append(out, b)
			break
		}
		out = append(out, b[:i+1])
		b = b[i+1:]
	}
	return out
}

// lineKey returns the key of a `key = value` line, or "".
func lineKey(l []byte) string {
	s := strings.TrimLeft(string(l), " \t")
	if s == "" || s[0] == '#' {
		return ""
	}
	i := strings.IndexByte(s, '=')
	if i <= 0 {
		return ""
	}
	return strings.TrimSpace(s[:i])
}

type movedLine struct {
	index int
	raw   []byte
}

// extractSensitive removes sensitive lines from vmx text.
func extractSensitive(text []byte) (rest []byte, moved []movedLine) {
	for i, l := range splitLines(text) {
		if k := lineKey(l); k != "" && sensitiveVMXKey(k) {
			moved = append(moved, movedLine{i, append([]byte(nil), l...)})
			continue
		}
		rest = append(rest, l...)
	}
	return rest, moved
}

// restoreSensitive puts moved lines back at their original positions.
func restoreSensitive(text []byte, moved []movedLine) []byte {
	sort.Slice(moved, func(i, j int) bool { return moved[i].index < moved[j].index })
	lines := splitLines(text)
	for _, m := range moved {
		at := min(m.index, len(lines))
		// A line that had no terminator was last; if lines now follow it,
		// the one before must end with a newline.
		if at > 0 && !bytes.HasSuffix(lines[at-1], []byte("\n")) {
			lines[at-1] = append(append([]byte(nil), lines[at-1]...), '\n')
		}
		lines = append(lines[:at], append([][]byte{m.raw}, lines[at:]...)...)
	}
	return bytes.Join(lines, nil)
}

const (
	vmxDataVersion = 0x01
	vmxDataInfo    = "vmx-data"
	vmxDataAD      = "vmcryptd v1 vmx-data"
)

func vmxDataAEAD(dek *DEK) (cipher.AEAD, error) {
	var prk []byte
	err := dek.with(func(key []byte) (err error) {
		prk, err = hkdf.Extract(sha256.New, key, []byte(kdfSalt))
		return err
	})
	if err != nil {
		return nil, err
	}
	defer clear(prk)
	key, err := hkdf.Expand(sha256.New, prk, vmxDataInfo, 32)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// sealVMXData encrypts moved lines into the base64 bundle.
func sealVMXData(dek *DEK, vmID string, moved []movedLine) (string, error) {
	return sealVMXDataNonce(dek, vmID, moved, nil)
}

// sealVMXDataNonce takes a fixed nonce for the FORMAT.md vectors only.
func sealVMXDataNonce(dek *DEK, vmID string, moved []movedLine, fixedNonce []byte) (string, error) {
	var p []byte
	for _, m := range moved {
		p = binary.LittleEndian.AppendUint32(p, uint32(m.index))
		p = binary.LittleEndian.AppendUint32(p, uint32(len(m.raw)))
		p = append(p, m.raw...)
	}
	aead, err := vmxDataAEAD(dek)
	if err != nil {
		return "", fmt.Errorf("encryption.data: %w", err)
	}
	nonce := make([]byte, aead.NonceSize())
	if fixedNonce != nil {
		copy(nonce, fixedNonce)
	} else if _, err := rand.Read(nonce); err != nil {
		return "", fmt.Errorf("encryption.data: crypto/rand: %w", err)
	}
	out := append([]byte{vmxDataVersion}, nonce...)
	out = aead.Seal(out, nonce, p, []byte(vmxDataAD+vmID))
	clear(p)
	return base64.StdEncoding.EncodeToString(out), nil
}

// openVMXData decrypts the bundle.
func openVMXData(dek *DEK, vmID, b64 string) ([]movedLine, error) {
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("encryption.data: %w", err)
	}
	aead, err := vmxDataAEAD(dek)
	if err != nil {
		return nil, fmt.Errorf("encryption.data: %w", err)
	}
	ns := aead.NonceSize()
	if len(raw) < 1+ns+aead.Overhead() || raw[0] != vmxDataVersion {
		return nil, errors.New("encryption.data: bad length or version")
	}
	p, err := aead.Open(nil, raw[1:1+ns], raw[1+ns:], []byte(vmxDataAD+vmID))
	if err != nil {
		return nil, errors.New("encryption.data: authentication failed (wrong key or bundle from another VM)")
	}
	var out []movedLine
	for len(p) > 0 {
		if len(p) < 8 {
			return nil, errors.New("encryption.data: truncated record")
		}
		idx, n := binary.LittleEndian.Uint32(p), binary.LittleEndian.Uint32(p[4:])
		if uint64(n) > uint64(len(p)-8) {
			return nil, errors.New("encryption.data: record length out of range")
		}
		out = append(out, movedLine{int(idx), append([]byte(nil), p[8:8+n]...)})
		p = p[8+n:]
	}
	return out, nil
}

// rekeyVMX moves the vmx's encryption.data bundle (if any) from the VM
// DEK from to the VM DEK to, sets encryption.keySafe to ks and writes the
// vmx with write: the vmx step of a deep rekey, and of its abort.
func rekeyVMX(l *vmLayout, vmID string, from, to *DEK, ks string, write textWriter) error {
	if data, ok := l.VMX.Get(VMXData); ok && data != "" {
		moved, err := openVMXData(from, vmID, data)
		if err != nil {
			return fmt.Errorf("%s: %w", l.VMXPath, err)
		}
		sealed, err := sealVMXData(to, vmID, moved)
		if err != nil {
			return err
		}
		if err := l.VMX.Set(VMXData, sealed); err != nil {
			return err
		}
	}
	if err := l.VMX.Set(VMXKeySafe, ks); err != nil {
		return err
	}
	return write(l.VMXPath, l.VMX.Bytes())
}

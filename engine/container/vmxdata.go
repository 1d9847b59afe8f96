package container

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
)

// The vmx `encryption.data` bundle (docs/FORMAT.md 4.2): sensitive vmx
// lines, moved out of the text file (formats/vmx.ExtractSensitive) and
// encrypted under the VM DEK, with their original line positions so
// decryption restores the file exactly (vmx.RestoreSensitive).

const (
	vmxDataVersion = 0x01
	vmxDataInfo    = "vmx-data"
	vmxDataAD      = "vmcryptd v1 vmx-data"
)

func vmxDataAEAD(dek *keys.DEK) (cipher.AEAD, error) {
	var prk []byte
	err := dek.With(func(key []byte) (err error) {
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

// SealVMXData encrypts moved lines into the base64 bundle.
func SealVMXData(dek *keys.DEK, vmID string, moved []vmx.MovedLine) (string, error) {
	return SealVMXDataNonce(dek, vmID, moved, nil)
}

// SealVMXDataNonce takes a fixed nonce for the FORMAT.md vectors only.
func SealVMXDataNonce(dek *keys.DEK, vmID string, moved []vmx.MovedLine, fixedNonce []byte) (string, error) {
	var p []byte
	for _, m := range moved {
		p = binary.LittleEndian.AppendUint32(p, uint32(m.Index))
		p = binary.LittleEndian.AppendUint32(p, uint32(len(m.Raw)))
		p = append(p, m.Raw...)
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

// OpenVMXData decrypts the bundle.
func OpenVMXData(dek *keys.DEK, vmID, b64 string) ([]vmx.MovedLine, error) {
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
	var out []vmx.MovedLine
	for len(p) > 0 {
		if len(p) < 8 {
			return nil, errors.New("encryption.data: truncated record")
		}
		idx, n := binary.LittleEndian.Uint32(p), binary.LittleEndian.Uint32(p[4:])
		if uint64(n) > uint64(len(p)-8) {
			return nil, errors.New("encryption.data: record length out of range")
		}
		out = append(out, vmx.MovedLine{Index: int(idx), Raw: append([]byte(nil), p[8:8+n]...)})
		p = p[8+n:]
	}
	return out, nil
}

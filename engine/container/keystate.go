package container

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// fileKeyState says whether path is plain, a container under dek, or a
// container under some other key.
type fileKeyState int

const (
	StatePlain fileKeyState = iota
	StateUnderKey
	StateOtherKey
)

// KeyStateOf also returns, for a container under dek, the kind its
// authenticated header slot records (PeekHeader's newest slot may be a
// forgery that does not verify).
func KeyStateOf(path string, dek *keys.DEK) (fileKeyState, Kind, error) {
	f, err := safeopen.Open(path, os.O_RDONLY)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	region := make([]byte, 2*SlotSize)
	n, _ := io.ReadFull(f, region)
	if _, err := PeekHeader(region[:n]); err != nil {
		return StatePlain, 0, nil
	}
	keys, err := DeriveContainerKeys(dek)
	if err != nil {
		return 0, 0, err
	}
	defer keys.Destroy()
	h, _, err := VerifyHeader(region, keys)
	if err != nil {
		if errors.Is(err, ErrWrongKey) {
			return StateOtherKey, 0, nil
		}
		return 0, 0, fmt.Errorf("%s: %w", path, err)
	}
	return StateUnderKey, h.Kind, nil
}

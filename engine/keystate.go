package engine

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// fileKeyState says whether path is plain, a container under dek, or a
// container under some other key.
type fileKeyState int

const (
	statePlain fileKeyState = iota
	stateUnderKey
	stateOtherKey
)

// keyStateOf also returns, for a container under dek, the kind its
// authenticated header slot records (PeekHeader's newest slot may be a
// forgery that does not verify).
func keyStateOf(path string, dek *DEK) (fileKeyState, Kind, error) {
	f, err := safeopen.Open(path, os.O_RDONLY)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	region := make([]byte, 2*slotSize)
	n, _ := io.ReadFull(f, region)
	if _, err := PeekHeader(region[:n]); err != nil {
		return statePlain, 0, nil
	}
	keys, err := deriveContainerKeys(dek)
	if err != nil {
		return 0, 0, err
	}
	defer keys.destroy()
	h, _, err := verifyHeader(region, keys)
	if err != nil {
		if errors.Is(err, ErrWrongKey) {
			return stateOtherKey, 0, nil
		}
		return 0, 0, fmt.Errorf("%s: %w", path, err)
	}
	return stateUnderKey, h.Kind, nil
}

package container

import (
	"fmt"
	"os"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// RepairHeader rewrites both header slots of the container at path from
// its authenticated slot (FORMAT.md 3.1), mirrored, with a sequence
// number above either slot's. It refuses when the file holds data past
// what that slot's logical size covers, unless sizeHint (> 0: a flat
// extent's size from its descriptor) covers it; then the size becomes
// sizeHint. It never changes a byte of the payload.
func RepairHeader(path string, dek *keys.DEK, sizeHint int64) (string, error) {
	f, err := safeopen.Open(path, os.O_RDWR)
	if err != nil {
		return "", fmt.Errorf("repair %s: %w", path, err)
	}
	region := make([]byte, 2*SlotSize)
	if _, err := f.ReadAt(region, 0); err != nil {
		f.Close()
		return "", fmt.Errorf("repair %s: %w", path, err)
	}
	keys, err := DeriveContainerKeys(dek)
	if err != nil {
		f.Close()
		return "", fmt.Errorf("repair %s: %w", path, err)
	}
	h, health, err := VerifyHeader(region, keys)
	if err != nil {
		keys.Destroy()
		f.Close()
		return "", fmt.Errorf("repair %s: %w", path, err)
	}
	if health.Degraded == "" && !health.Interrupted {
		keys.Destroy()
		f.Close()
		return "both header slots are intact and equal; nothing to repair", nil
	}
	// The next sequence number follows the authenticated slot's only: a
	// damaged slot's number is anybody's (2^64-1 would wrap to 0).
	hdr := *h
	what := fmt.Sprintf("header slots rewritten from slot %d (logical size %d)", h.Slot, h.Size)
	if end, beyond := dataBeyond(f, h.MinBackingSize()); beyond && health.Degraded != "" {
		need := end - h.PayloadOff
		if sizeHint <= 0 || ceilTo(sizeHint, int64(h.UnitSize)) < need {
			keys.Destroy()
			f.Close()
			return "", fmt.Errorf("repair %s: the surviving header slot records %d logical bytes but the file holds data up to %d: the damaged slot may have been newer and its size is lost; restore the file from a backup (nothing was changed)", path, h.Size, need)
		}
		hdr.Size = sizeHint
		what = fmt.Sprintf("header slots rewritten from slot %d with the size its descriptor gives (%d bytes; the surviving slot said %d)", h.Slot, sizeHint, h.Size)
	}
	st, err := f.Stat()
	if err != nil || st.Size() < hdr.MinBackingSize() {
		keys.Destroy()
		f.Close()
		return "", fmt.Errorf("repair %s: %w", path, ErrTruncated)
	}
	c, err := newContainer(f, path, keys, hdr, "")
	if err != nil {
		f.Close()
		return "", fmt.Errorf("repair %s: %w", path, err)
	}
	c.hdrMu.Lock()
	err = c.writeHeaderLocked()
	c.hdrMu.Unlock()
	if cerr := c.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("repair %s: %w", path, err)
	}
	return what, nil
}

func ceilTo(n, unit int64) int64 { return (n + unit - 1) / unit * unit }

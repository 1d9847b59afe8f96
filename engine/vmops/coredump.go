package vmops

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// Core dumps of a VM are encrypted with the host key, as on ESXi: each
// dump gets its own DEK (purpose "coredump", owner a fresh id) wrapped
// under the host KEK and embedded in the container header, since a dump
// has no text file to carry a keySafe.

// EncryptCoreDump converts one plain core dump.
func (o *VMOps) EncryptCoreDump(ctx context.Context, path string, temp container.TempFunc) error {
	if o.HostKEK == nil {
		return fmt.Errorf("%s: core dumps are encrypted with the host key, and host encryption mode is off", path)
	}
	if isC, err := keyStateOfAny(path); err != nil || isC {
		return err // already a container (or unreadable)
	}
	dek, b, ks, err := o.newBoundKey(ctx, *o.HostKEK, keys.PurposeCoreDump)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer dek.Destroy()
	return container.EncryptFileTemp(ctx, path, dek, container.CreateOptions{Kind: container.KindCoreDump, Binding: b, Impl: o.Impl, EmbeddedKeySafe: ks}, nil, temp)
}

// decryptCoreDump converts an encrypted core dump back (no-op if plain).
func (o *VMOps) decryptCoreDump(ctx context.Context, path string, temp container.TempFunc) error {
	f, err := safeopen.Open(path, os.O_RDONLY)
	if err != nil {
		return err
	}
	region := make([]byte, container.HeaderSize)
	n, _ := f.ReadAt(region, 0)
	f.Close()
	h, err := container.PeekHeader(region[:n])
	if errors.Is(err, container.ErrNotContainer) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	ks, ok := container.ReadEmbeddedKeySafe(region[:n])
	if !ok {
		return fmt.Errorf("%s: encrypted core dump without a keySafe", path)
	}
	if h.Binding.Purpose != keys.PurposeCoreDump {
		return fmt.Errorf("%s: %w: a %s key where a core dump's is expected", path, container.ErrWrongKey, h.Binding.Purpose)
	}
	dek, _, err := o.unwrapFrom(ctx, ks, h.Binding)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer dek.Destroy()
	// The kind of the slot the key authenticates (not PeekHeader's).
	if state, kind, err := container.KeyStateOf(path, dek); err != nil || state != container.StateUnderKey || kind != container.KindCoreDump {
		if err == nil {
			err = fmt.Errorf("%s: %w: not a core dump container", path, container.ErrKindMismatch)
		}
		return err
	}
	return container.DecryptFileTemp(ctx, path, dek, nil, temp)
}

func (o *VMOps) coreDumps(ctx context.Context, l *vm.Layout, encrypt bool, temp container.TempFunc) error {
	for _, c := range l.CoreDumps {
		p := filepath.Join(l.Dir, c)
		var err error
		if encrypt {
			err = o.EncryptCoreDump(ctx, p, temp)
		} else {
			err = o.decryptCoreDump(ctx, p, temp)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

package view

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
)

// The resolver's DEKs: which DEK opens a file its role allows, unwrapped
// once and cached by fingerprint until Forget.

// dekFor unwraps the DEK of the container at path with the key its role
// names, after checking that its header carries the binding (or, for a
// header copy, the purpose and kind) the role allows.
func (d *Datastore) dekFor(path string, head []byte, r vm.Role) (*keys.DEK, error) {
	slots := container.PeekSlots(head)
	if len(slots) == 0 {
		_, err := container.PeekHeader(head)
		return nil, err
	}
	// Any slot that parses may name the key: a damaged field in one slot
	// must leave the other to serve (degraded), and OpenContainer's MAC
	// check decides which slot holds. Each candidate binding is tried.
	// The kind clause is judged here on the unauthenticated slots too,
	// so Classify refuses what Open would (the MAC check at open judges
	// it again on the slot that verifies).
	ks := r.KeySafe
	var cands []*container.Header
	var kindErr error
	for _, s := range slots {
		ok := s.Binding == r.Owner
		if ks == "" {
			ok = s.Binding.Purpose == r.Purpose
		}
		if ok {
			if err := vm.KindFits(path, r, s.Kind); err != nil {
				kindErr, ok = err, false
			}
		}
		if ok && (len(cands) == 0 || cands[0].Binding != s.Binding) {
			cands = append(cands, s)
		}
	}
	if len(cands) == 0 && kindErr != nil {
		return nil, kindErr
	}
	if len(cands) == 0 {
		if ks != "" {
			return nil, fmt.Errorf("%s: %w: its header names %s %s, its VM's files %s %s", path, container.ErrWrongKey, slots[0].Binding.Purpose, slots[0].Binding.OwnerID, r.Owner.Purpose, r.Owner.OwnerID)
		}
		return nil, fmt.Errorf("%s: %w: a %s container bound to a %s key where a %s is expected", path, container.ErrWrongKey, slots[0].Kind, slots[0].Binding.Purpose, r.Purpose)
	}
	if ks == "" {
		eks, ok := container.ReadEmbeddedKeySafe(head)
		if !ok {
			return nil, fmt.Errorf("%s: no keySafe for %s %s", path, cands[0].Binding.Purpose, cands[0].Binding.OwnerID)
		}
		ks = eks
	}
	dir := filepath.Dir(path)
	var firstErr error
	for _, h := range cands {
		d.mu.Lock()
		dek, ok := d.deks[dekKey{dir, h.Binding, h.Fingerprint}]
		d.mu.Unlock()
		if ok {
			return dek, nil
		}
		dek, err := d.cachedDEK(dir, h.Binding, ks)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		fp, err := container.DEKFingerprint(dek)
		if err != nil {
			return nil, err
		}
		for _, s := range slots {
			if s.Binding == h.Binding && s.Fingerprint == fp {
				return dek, nil
			}
		}
	}
	if firstErr != nil {
		return nil, firstErr
	}
	return nil, fmt.Errorf("%s: %w (its keySafe holds another DEK)", path, container.ErrWrongKey)
}

// cachedDEK unwraps the DEK of ks and caches it (by fingerprint).
func (d *Datastore) cachedDEK(dir string, b keys.Binding, ks string) (*keys.DEK, error) {
	entries, err := keys.DecodeKeySafe(ks)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, e := range entries {
		kek, ok := d.Keys.Peek(e.KEK)
		if !ok {
			why := "not loaded"
			if d.keyErr != nil {
				if s := d.keyErr(e.KEK); s != "" {
					why = s
				}
			}
			errs = append(errs, fmt.Errorf("key %s %w: %s", e.KEK, keys.ErrKeyUnavailable, why))
			continue
		}
		dek, err := keys.UnwrapDEK(kek, e.Locked, b)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fp, err := container.DEKFingerprint(dek)
		if err != nil {
			dek.Destroy()
			return nil, err
		}
		k := dekKey{dir, b, fp}
		d.mu.Lock()
		if old, ok := d.deks[k]; ok { // already cached: keep one copy
			d.mu.Unlock()
			dek.Destroy()
			return old, nil
		}
		d.deks[k] = dek
		d.mu.Unlock()
		return dek, nil
	}
	return nil, errors.Join(errs...)
}

// Forget drops the cached DEKs and layout of one VM directory (after a
// rekey or a decrypt changed them), or of all when dir is "".
func (d *Datastore) Forget(dir string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k := range d.layouts {
		if dir == "" || k == filepath.Clean(dir) {
			delete(d.layouts, k)
		}
	}
	for k := range d.pending {
		if dir == "" || filepath.Dir(k) == filepath.Clean(dir) {
			delete(d.pending, k)
		}
	}
	for k := range d.kept {
		if dir == "" || filepath.Dir(k) == filepath.Clean(dir) {
			delete(d.kept, k)
		}
	}
	for k, dek := range d.deks {
		if dir == "" || k.dir == filepath.Clean(dir) {
			dek.Destroy()
			delete(d.deks, k)
		}
	}
}

// Close zeroes every cached DEK.
func (d *Datastore) Close() { d.Forget("") }

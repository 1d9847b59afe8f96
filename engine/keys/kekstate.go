package keys

import (
	"context"
	"errors"
	"fmt"
	"syscall"
)

// KMIP life-cycle states a KEK can be held in, spelled as KMIP names them
// (and as kms.KeyState.String prints them).
const (
	KEKActive      = "Active"
	KEKDeactivated = "Deactivated"
	KEKCompromised = "Compromised"
)

// KeyStateServer is the optional part of a KeyServer that returns a key
// with its KMIP state: the key material of an Active, Deactivated or
// Compromised key (the last two are revoked: KMIP lets them unwrap, never
// protect new data), an error for every other state. kms.Provider
// implements it; a KeyServer without it only hands out Active keys.
type KeyStateServer interface {
	FetchKEK(ctx context.Context, id string) (raw []byte, state string, err error)
}

// ErrKeyRevoked is returned when a revoked (Deactivated or Compromised)
// KEK would protect new data: wrap a new DEK, or let the view write files
// whose DEK it wraps.
var ErrKeyRevoked = errors.New("it may only unwrap; rekey the VM onto an active key")

// KekUse is the one decision on what a KEK in KMIP state state may do:
// unwrap existing DEKs, and wrap new ones (or let new data be written
// under DEKs it wraps). An empty state is a key from a KeyServer that only
// hands out Active keys.
func KekUse(state string) (unwrap, wrap bool) {
	switch state {
	case KEKActive, "":
		return true, true
	case KEKDeactivated, KEKCompromised:
		return true, false
	}
	return false, false
}

// State is the KMIP state the key was in when it was fetched.
func (k *KEK) State() string {
	if k.state == "" {
		return KEKActive
	}
	return k.state
}

// Revoked reports whether the key may unwrap but not wrap (Deactivated or
// Compromised when it was fetched).
func (k *KEK) Revoked() bool {
	unwrap, wrap := KekUse(k.state)
	return unwrap && !wrap
}

// MayWrap refuses a KEK that may not protect new data, naming it. The
// error also wraps EROFS: through the view, writing under a revoked key
// is a read-only file system.
func (k *KEK) MayWrap() error {
	if k == nil {
		return errors.New("kek not loaded")
	}
	if _, wrap := KekUse(k.state); !wrap {
		return &revokedError{ref: k.Ref, state: k.State()}
	}
	return nil
}

type revokedError struct {
	ref   KeyRef
	state string
}

func (e *revokedError) Error() string {
	return fmt.Sprintf("key %s is %s: %v", e.ref, e.state, ErrKeyRevoked)
}

func (e *revokedError) Unwrap() []error { return []error{ErrKeyRevoked, syscall.EROFS} }

// RevokedKey is a cached KEK that may only unwrap.
type RevokedKey struct {
	Ref   KeyRef
	State string
}

// Revoked lists the cached KEKs that are revoked, sorted by reference.
func (r *Keyring) Revoked() []RevokedKey {
	var out []RevokedKey
	for _, ref := range r.Refs() {
		if k, ok := r.Peek(ref); ok && k.Revoked() {
			out = append(out, RevokedKey{Ref: ref, State: k.State()})
		}
	}
	return out
}

package keys

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"

	"golang.org/x/sync/singleflight"
)

// KeyServer is what the engine needs from a key provider: create a KEK and
// fetch one by id. kms.Provider implements it; the engine never speaks
// KMIP itself.
type KeyServer interface {
	CreateKey(ctx context.Context, name string) (id string, err error)
	// GetKey returns the raw key; the caller takes ownership and clears it.
	GetKey(ctx context.Context, id string) ([]byte, error)
}

// Keyring caches KEKs by reference, in locked memory only. It is filled
// on demand (concurrent requests for one key share one fetch) and never
// persisted: after a restart every KEK is fetched again by id.
type Keyring struct {
	mu        sync.Mutex
	providers map[string]KeyServer
	keys      map[KeyRef]*KEK
	fetches   singleflight.Group // one fetch per KeyRef at a time
	locked    bool               // see Lock (keyring_lock.go)
	// resolve serves provider names that are not registered with
	// SetProvider: a key source such as the manager, which brokers every
	// provider it knows (see SetResolver).
	resolve func(provider string) KeyServer
}

// NewKeyring returns an empty keyring.
func NewKeyring() *Keyring {
	return &Keyring{providers: map[string]KeyServer{}, keys: map[KeyRef]*KEK{}}
}

// SetProvider registers (or replaces, or with nil removes) a provider.
func (r *Keyring) SetProvider(name string, ks KeyServer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ks == nil {
		delete(r.providers, name)
		return
	}
	r.providers[name] = ks
}

// SetResolver makes resolve the key server of every provider name not
// registered with SetProvider (nil removes it). A host whose key source
// is the manager uses it: the manager names the providers, not the host.
func (r *Keyring) SetResolver(resolve func(provider string) KeyServer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.resolve = resolve
}

// lookupLocked finds the key server of provider name; r.mu is held.
func (r *Keyring) lookupLocked(name string) (KeyServer, bool) {
	if ks, ok := r.providers[name]; ok {
		return ks, true
	}
	if r.resolve != nil && name != "" {
		if ks := r.resolve(name); ks != nil {
			return ks, true
		}
	}
	return nil, false
}

func (r *Keyring) provider(name string) (KeyServer, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ks, ok := r.lookupLocked(name)
	if !ok {
		return nil, fmt.Errorf("key provider %q is not configured", name)
	}
	return ks, nil
}

// Create makes a new KEK on provider and caches it.
func (r *Keyring) Create(ctx context.Context, provider, name string) (*KEK, error) {
	if r.Locked() {
		return nil, fmt.Errorf("create key on provider %q: %w", provider, ErrLocked)
	}
	ks, err := r.provider(provider)
	if err != nil {
		return nil, err
	}
	id, err := ks.CreateKey(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("create key on provider %q: %w", provider, err)
	}
	return r.Get(ctx, KeyRef{Provider: provider, KeyID: id})
}

// Get returns the cached KEK or fetches it. The returned KEK stays owned
// by the keyring: do not Destroy it.
func (r *Keyring) Get(ctx context.Context, ref KeyRef) (*KEK, error) {
	r.mu.Lock()
	if r.locked {
		r.mu.Unlock()
		return nil, fmt.Errorf("kek %s: %w", ref, ErrLocked)
	}
	if k, ok := r.keys[ref]; ok {
		r.mu.Unlock()
		return k, nil
	}
	ks, ok := r.lookupLocked(ref.Provider)
	r.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("kek %s: key provider %q is not configured", ref, ref.Provider)
	}
	// Concurrent requests for one key share one fetch (the first
	// caller's context bounds it); each waiter still gives up on its own
	// context. The NUL cannot occur in a provider name from the config,
	// so the group key is unambiguous.
	ch := r.fetches.DoChan(ref.Provider+"\x00"+ref.KeyID, func() (any, error) {
		kek, err := r.fetch(ctx, ks, ref)
		r.mu.Lock()
		defer r.mu.Unlock()
		switch {
		case err != nil:
			return nil, err
		case r.locked: // locked while the fetch ran
			kek.Destroy()
			return nil, fmt.Errorf("kek %s: %w", ref, ErrLocked)
		}
		if old, ok := r.keys[ref]; ok { // a fetch that finished first
			kek.Destroy()
			return old, nil
		}
		r.keys[ref] = kek
		return kek, nil
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*KEK), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (r *Keyring) fetch(ctx context.Context, ks KeyServer, ref KeyRef) (*KEK, error) {
	var raw []byte
	var state string
	var err error
	if kss, ok := ks.(KeyStateServer); ok {
		raw, state, err = kss.FetchKEK(ctx, ref.KeyID)
	} else {
		raw, err = ks.GetKey(ctx, ref.KeyID)
	}
	if err != nil {
		return nil, fmt.Errorf("kek %s %w: %w", ref, ErrKeyUnavailable, err)
	}
	if unwrap, _ := KekUse(state); !unwrap {
		clear(raw)
		return nil, fmt.Errorf("kek %s: key server returned it in state %q", ref, state)
	}
	kek, err := NewKEK(ref, raw)
	if err != nil {
		return nil, err
	}
	kek.state = state
	return kek, nil
}

// Peek returns the KEK if it is in memory now, without fetching it.
func (r *Keyring) Peek(ref KeyRef) (*KEK, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k, ok := r.keys[ref]
	return k, ok
}

// Cached reports whether ref is in memory now.
func (r *Keyring) Cached(ref KeyRef) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.keys[ref]
	return ok
}

// Refs lists the cached key references, sorted.
func (r *Keyring) Refs() []KeyRef {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]KeyRef, 0, len(r.keys))
	for ref := range r.keys {
		out = append(out, ref)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out
}

// AllMemoryLocked reports whether every cached KEK is in mlock'ed memory.
func (r *Keyring) AllMemoryLocked() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range r.keys {
		if !k.MemoryLocked() {
			return false
		}
	}
	return true
}

// Forget zeroes and drops one KEK. Callers must make sure nothing still
// needs it (a rekey drops the old KEK only after every copy wrapped under
// it was rewritten).
func (r *Keyring) Forget(ref KeyRef) {
	r.mu.Lock()
	k := r.keys[ref]
	delete(r.keys, ref)
	r.mu.Unlock()
	k.Destroy()
}

// Close zeroes every cached KEK.
func (r *Keyring) Close() {
	r.mu.Lock()
	keys := r.keys
	r.keys = map[KeyRef]*KEK{}
	r.mu.Unlock()
	for _, k := range keys {
		k.Destroy()
	}
}

// ErrNoProvider is returned when no key provider is configured at all.
var ErrNoProvider = errors.New("no key provider configured")

// ErrKeyUnavailable means the KEK that wraps a file's DEK is not in
// memory (not fetched yet, or its key server refused it).
var ErrKeyUnavailable = errors.New("not available")

package manager

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/singleflight"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
	"github.com/vmcryptd/vmcryptd/internal/secmem"
)

// keySource is what the cache needs from a key provider (kms.Provider).
type keySource interface {
	CreateKey(ctx context.Context, name string) (string, error)
	FetchKEK(ctx context.Context, id string) (raw []byte, state string, err error)
}

// keyCache holds KEKs fetched from the KMS in locked memory, so a host
// restart storm costs one KMS fetch per key: concurrent requests for one
// key share one fetch (singleflight), later ones are served from memory.
// Nothing is persisted; the manager forgets every key on shutdown.
type keyCache struct {
	mu      sync.Mutex
	keys    map[mgrproto.KeyRef]*cachedKey
	group   singleflight.Group
	fetches atomic.Int64 // KMS fetches made
}

type cachedKey struct {
	mu    sync.RWMutex // held while the key is read; Free takes it
	buf   *secmem.Buffer
	state string
}

func newKeyCache() *keyCache { return &keyCache{keys: map[mgrproto.KeyRef]*cachedKey{}} }

// with runs fn with the key's bytes (locked memory: do not keep them) and
// its KMIP state, fetching the key from src first when needed.
func (c *keyCache) with(ctx context.Context, src keySource, ref mgrproto.KeyRef, fn func(key []byte, state string) error) error {
	k, err := c.get(ctx, src, ref)
	if err != nil {
		return err
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.buf.Len() == 0 {
		return fmt.Errorf("key %s: forgotten while in use (manager shutting down)", ref)
	}
	return fn(k.buf.Bytes(), k.state)
}

func (c *keyCache) get(ctx context.Context, src keySource, ref mgrproto.KeyRef) (*cachedKey, error) {
	c.mu.Lock()
	k, ok := c.keys[ref]
	c.mu.Unlock()
	if ok {
		return k, nil
	}
	v, err, _ := c.group.Do(ref.String(), func() (any, error) {
		c.mu.Lock()
		if k, ok := c.keys[ref]; ok {
			c.mu.Unlock()
			return k, nil
		}
		c.mu.Unlock()
		c.fetches.Add(1)
		// The fetch belongs to every waiter, not to the first caller: it
		// is not cancelled with that caller's request.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
		defer cancel()
		raw, state, err := src.FetchKEK(fctx, ref.KeyID)
		if err != nil {
			return nil, err
		}
		if len(raw) != mgrproto.KeyLen {
			n := len(raw)
			clear(raw)
			return nil, fmt.Errorf("key %s: the KMS returned %d bytes, want %d (AES-256)", ref, n, mgrproto.KeyLen)
		}
		buf, err := secmem.FromBytes(raw)
		if err != nil {
			return nil, fmt.Errorf("key %s: %w", ref, err)
		}
		k := &cachedKey{buf: buf, state: state}
		c.mu.Lock()
		c.keys[ref] = k
		c.mu.Unlock()
		return k, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*cachedKey), nil
}

// count is the number of cached keys; locked whether all are mlock'ed.
func (c *keyCache) count() (n int, locked bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	locked = true
	for _, k := range c.keys {
		if !k.buf.Locked() {
			locked = false
		}
	}
	return len(c.keys), locked
}

// close zeroes every cached key.
func (c *keyCache) close() {
	c.mu.Lock()
	keys := c.keys
	c.keys = map[mgrproto.KeyRef]*cachedKey{}
	c.mu.Unlock()
	for _, k := range keys {
		k.mu.Lock()
		_ = k.buf.Free()
		k.mu.Unlock()
	}
}

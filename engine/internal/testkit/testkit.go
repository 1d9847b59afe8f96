// Package testkit holds what the engine's tests share across its
// packages: an in-memory key server, random bytes, a fresh DEK. Only
// tests import it.
package testkit

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"sync"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/keys"
)

// MemKeyServer is an in-process key server for engine tests: the engine
// only sees the KeyServer interface; the real KMIP servers are exercised by
// the kms package and the daemon's end-to-end tests.
type MemKeyServer struct {
	mu   sync.Mutex
	Keys map[string][]byte
	n    int
}

func (m *MemKeyServer) CreateKey(ctx context.Context, name string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.Keys == nil {
		m.Keys = map[string][]byte{}
	}
	m.n++
	id := fmt.Sprintf("key-%d", m.n)
	k := make([]byte, keys.KEKSize)
	rand.Read(k)
	m.Keys[id] = k
	return id, nil
}

func (m *MemKeyServer) GetKey(ctx context.Context, id string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.Keys[id]
	if !ok {
		return nil, fmt.Errorf("key %s not found", id)
	}
	return bytes.Clone(k), nil
}

// RandBytes returns n random bytes.
func RandBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// MustDEK returns a fresh DEK destroyed when the test ends.
func MustDEK(t testing.TB) *keys.DEK {
	t.Helper()
	d, err := keys.NewDEK()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Destroy)
	return d
}

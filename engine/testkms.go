package engine

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"sync"
)

// memKeyServer is an in-process key server for engine tests: the engine
// only sees the KeyServer interface; the real KMIP servers are exercised by
// the kms package and the daemon's end-to-end tests.
type memKeyServer struct {
	mu   sync.Mutex
	keys map[string][]byte
	n    int
}

func (m *memKeyServer) CreateKey(ctx context.Context, name string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.keys == nil {
		m.keys = map[string][]byte{}
	}
	m.n++
	id := fmt.Sprintf("key-%d", m.n)
	k := make([]byte, KEKSize)
	rand.Read(k)
	m.keys[id] = k
	return id, nil
}

func (m *memKeyServer) GetKey(ctx context.Context, id string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[id]
	if !ok {
		return nil, fmt.Errorf("key %s not found", id)
	}
	return bytes.Clone(k), nil
}

package enginetest

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/internal/testkit"
	"github.com/vmcryptd/vmcryptd/engine/keys"
)

// CountingKS counts fetches, so a test can prove a locked keyring asks
// no key server.
type countingKS struct {
	testkit.MemKeyServer
	gets atomic.Int32
}

func (c *countingKS) GetKey(ctx context.Context, id string) ([]byte, error) {
	c.gets.Add(1)
	return c.MemKeyServer.GetKey(ctx, id)
}

func TestKeyringLock(t *testing.T) {
	ctx := context.Background()
	ks := &countingKS{}
	kr := keys.NewKeyring()
	kr.SetProvider("mem", ks)
	a, err := kr.Create(ctx, "mem", "a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := kr.Create(ctx, "mem", "b")
	if err != nil {
		t.Fatal(err)
	}
	if n := kr.Lock(); n != 2 {
		t.Fatalf("Lock zeroed %d keys, want 2", n)
	}
	// The KEKs handed out before are destroyed: wrapping with them fails.
	for _, k := range []*keys.KEK{a, b} {
		if err := k.With(func([]byte) error { return nil }); err == nil {
			t.Errorf("kek %s still usable after Lock", k.Ref)
		}
	}
	before := ks.gets.Load()
	steps := []struct {
		name string
		do   func() error
	}{
		{"get a", func() error { _, err := kr.Get(ctx, a.Ref); return err }},
		{"get b", func() error { _, err := kr.Get(ctx, b.Ref); return err }},
		{"create", func() error { _, err := kr.Create(ctx, "mem", "c"); return err }},
	}
	for _, s := range steps {
		err := s.do()
		if !errors.Is(err, keys.ErrLocked) || !errors.Is(err, keys.ErrKeyUnavailable) {
			t.Errorf("%s while locked: %v, want ErrLocked", s.name, err)
		}
	}
	if got := ks.gets.Load(); got != before {
		t.Errorf("locked keyring asked the key server %d times", got-before)
	}
	if len(kr.Refs()) != 0 || kr.Cached(a.Ref) || !kr.Locked() {
		t.Fatalf("locked keyring still holds %v", kr.Refs())
	}
	kr.Unlock()
	if kr.Locked() {
		t.Fatal("still locked after Unlock")
	}
	k, err := kr.Get(ctx, a.Ref)
	if err != nil || !kr.Cached(a.Ref) {
		t.Fatalf("get after Unlock: %v", err)
	}
	if err := k.With(func([]byte) error { return nil }); err != nil {
		t.Fatalf("refetched kek unusable: %v", err)
	}
}

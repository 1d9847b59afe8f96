package enginetest

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/keys"
)

// TestKeyringResolver: provider names not registered with SetProvider go
// to the resolver (the manager key source); registered ones never do, and
// a name the resolver does not know stays "not configured".
func TestKeyringResolver(t *testing.T) {
	ctx := context.Background()
	direct, brokered := &countingKS{}, &countingKS{}
	kr := keys.NewKeyring()
	kr.SetProvider("direct", direct)
	kr.SetResolver(func(name string) keys.KeyServer {
		if name == "via-manager" {
			return brokered
		}
		return nil
	})
	cases := []struct {
		provider string
		want     *countingKS
		wantErr  string
	}{
		{"direct", direct, ""},
		{"via-manager", brokered, ""},
		{"unknown", nil, `key provider "unknown" is not configured`},
	}
	for _, c := range cases {
		t.Run(c.provider, func(t *testing.T) {
			kek, err := kr.Create(ctx, c.provider, "k")
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("Create: %v, want %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			before := c.want.gets.Load()
			kr.Forget(kek.Ref)
			if _, err := kr.Get(ctx, kek.Ref); err != nil {
				t.Fatal(err)
			}
			if c.want.gets.Load() != before+1 {
				t.Fatalf("Get of %s did not reach its key server", kek.Ref)
			}
		})
	}
}

// gateKS is a key server whose GetKey blocks until release is closed and
// counts its calls.
type gateKS struct {
	calls   atomic.Int32
	release chan struct{}
}

func (g *gateKS) CreateKey(context.Context, string) (string, error) { return "k", nil }
func (g *gateKS) GetKey(ctx context.Context, id string) ([]byte, error) {
	g.calls.Add(1)
	<-g.release
	k := make([]byte, 32)
	k[0] = 1
	return k, nil
}

// TestKeyringSharesOneFetch: concurrent Gets of one key make one key
// server request and all get the same KEK; a waiter whose context ends
// gives up alone, and the shared fetch still fills the cache.
func TestKeyringSharesOneFetch(t *testing.T) {
	ks := &gateKS{release: make(chan struct{})}
	kr := keys.NewKeyring()
	defer kr.Close()
	kr.SetProvider("p", ks)
	ref := keys.KeyRef{Provider: "p", KeyID: "k1"}
	const n = 16
	got := make(chan *keys.KEK, n)
	for range n {
		go func() {
			k, err := kr.Get(context.Background(), ref)
			if err != nil {
				t.Error(err)
			}
			got <- k
		}()
	}
	for ks.calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	short, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := kr.Get(short, ref); !errors.Is(err, context.Canceled) {
		t.Fatalf("waiter with an ended context: %v", err)
	}
	close(ks.release)
	first := <-got
	for range n - 1 {
		if k := <-got; k != first {
			t.Fatal("concurrent Gets returned different KEKs")
		}
	}
	if c := ks.calls.Load(); c != 1 {
		t.Fatalf("%d key server requests, want 1", c)
	}
	if k, ok := kr.Peek(ref); !ok || k != first {
		t.Fatal("shared fetch did not fill the cache")
	}
}

package engine

import (
	"context"
	"strings"
	"testing"
)

// TestKeyringResolver: provider names not registered with SetProvider go
// to the resolver (the manager key source); registered ones never do, and
// a name the resolver does not know stays "not configured".
func TestKeyringResolver(t *testing.T) {
	ctx := context.Background()
	direct, brokered := &countingKS{}, &countingKS{}
	kr := NewKeyring()
	kr.SetProvider("direct", direct)
	kr.SetResolver(func(name string) KeyServer {
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

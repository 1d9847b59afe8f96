package enginetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/internal/testkit"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
)

// stateKeyServer hands out keys with a KMIP state, as kms.Provider does.
type stateKeyServer struct {
	testkit.MemKeyServer
	state map[string]string
}

func (s *stateKeyServer) FetchKEK(ctx context.Context, id string) ([]byte, string, error) {
	k, err := s.GetKey(ctx, id)
	if err != nil {
		return nil, "", err
	}
	st := s.state[id]
	if st == "" {
		st = keys.KEKActive
	}
	if u, _ := keys.KekUse(st); !u {
		clear(k)
		return nil, "", fmt.Errorf("key %s is %s", id, st)
	}
	return k, st, nil
}

func TestRevokedKEKUnwrapsButNeverWraps(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		state   string
		fetchOK bool
		wrapOK  bool
	}{
		{keys.KEKActive, true, true},
		{keys.KEKDeactivated, true, false},
		{keys.KEKCompromised, true, false},
		{"Destroyed", false, false},
	} {
		t.Run(tc.state, func(t *testing.T) {
			ks := &stateKeyServer{state: map[string]string{}}
			id, _ := ks.CreateKey(ctx, "k")
			ref := keys.KeyRef{Provider: "p", KeyID: id}
			// Wrap under the key while Active, then revoke it.
			before := keys.NewKeyring()
			before.SetProvider("p", ks)
			defer before.Close()
			active, err := before.Get(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			dek := testkit.MustDEK(t)
			b := keys.Binding{Purpose: keys.PurposeDisk, OwnerID: "disk-1"}
			locked, err := keys.WrapDEK(active, dek, b)
			if err != nil {
				t.Fatal(err)
			}
			ks.state[id] = tc.state

			r := keys.NewKeyring()
			r.SetProvider("p", ks)
			defer r.Close()
			kek, err := r.Get(ctx, ref)
			if !tc.fetchOK {
				if err == nil || !strings.Contains(err.Error(), tc.state) || !strings.Contains(err.Error(), id) {
					t.Fatalf("Get = %v, want an error naming key %s and state %s", err, id, tc.state)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if kek.State() != tc.state || kek.Revoked() == tc.wrapOK {
				t.Fatalf("State %q Revoked %v", kek.State(), kek.Revoked())
			}
			got, err := keys.UnwrapDEK(kek, locked, b)
			if err != nil {
				t.Fatalf("unwrap under a %s key: %v", tc.state, err)
			}
			if !bytes.Equal(got.Bytes(), dek.Bytes()) {
				t.Fatal("unwrapped DEK differs")
			}
			got.Destroy()
			_, err = keys.WrapDEK(kek, testkit.MustDEK(t), b)
			if tc.wrapOK {
				if err != nil {
					t.Fatal(err)
				}
				if len(r.Revoked()) != 0 {
					t.Fatalf("Revoked() = %v", r.Revoked())
				}
				return
			}
			want := fmt.Sprintf("key p/%s is %s: it may only unwrap; rekey the VM onto an active key", id, tc.state)
			if err == nil || err.Error() != want {
				t.Fatalf("wrap under a %s key: err = %v, want %q", tc.state, err, want)
			}
			if !errors.Is(err, keys.ErrKeyRevoked) || !errors.Is(err, syscall.EROFS) {
				t.Fatalf("wrap error %v is not ErrKeyRevoked and EROFS", err)
			}
			if rv := r.Revoked(); len(rv) != 1 || rv[0].Ref != ref || rv[0].State != tc.state {
				t.Fatalf("Revoked() = %v", rv)
			}
		})
	}
}

// TestWritableUnder: the view's write gate refuses a keySafe one of whose
// KEKs in memory is revoked, naming it, and lets others through.
func TestWritableUnder(t *testing.T) {
	ctx := context.Background()
	ks := &stateKeyServer{state: map[string]string{}}
	active, _ := ks.CreateKey(ctx, "a")
	revoked, _ := ks.CreateKey(ctx, "r")
	ks.state[revoked] = keys.KEKCompromised
	r := keys.NewKeyring()
	r.SetProvider("p", ks)
	defer r.Close()
	ref := func(id string) keys.KeyRef { return keys.KeyRef{Provider: "p", KeyID: id} }
	for _, id := range []string{active, revoked} {
		if _, err := r.Get(ctx, ref(id)); err != nil {
			t.Fatal(err)
		}
	}
	keySafe := func(ids ...string) string {
		var es []keys.KeySafeEntry
		for _, id := range ids {
			es = append(es, keys.KeySafeEntry{KEK: ref(id), Locked: make([]byte, keys.LockedDataLen)})
		}
		s, err := keys.EncodeKeySafe(es)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	d := &view.Datastore{Keys: r}
	for _, tc := range []struct {
		name   string
		ks     string
		refuse bool
	}{
		{"no keySafe", "", false},
		{"active KEK", keySafe(active), false},
		{"revoked KEK", keySafe(revoked), true},
		{"active and revoked", keySafe(active, revoked), true},
		{"KEK not in memory", keySafe("absent"), false}, // the unwrap that follows refuses it
	} {
		err := d.WritableUnder(tc.ks)
		if !tc.refuse {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
			continue
		}
		if !errors.Is(err, syscall.EROFS) || !errors.Is(err, keys.ErrKeyRevoked) || !strings.Contains(err.Error(), "p/"+revoked+" is Compromised") {
			t.Errorf("%s: err = %v, want EROFS naming p/%s", tc.name, err, revoked)
		}
	}
}

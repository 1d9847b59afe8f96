package manager

import (
	"bytes"
	"context"
	"testing"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
	"github.com/vmcryptd/vmcryptd/kms/kmstest"
)

// TestPyKMIPAsManagerKMS: a real pykmip-server is the manager's key
// provider; a host gets a key made through the manager, the same key
// again after a manager restart, and another host is refused it.
func TestPyKMIPAsManagerKMS(t *testing.T) {
	py := kmstest.StartPyKMIP(t)
	c := py.Config("pykmip")
	l := startLabWith(t, &c)
	ctx := context.Background()
	h1, _ := l.addHost("host1")
	h2, _ := l.addHost("host2")
	ref, err := h1.CreateKey(ctx, "", "vm-on-pykmip")
	if err != nil {
		t.Fatal(err)
	}
	if ref.Provider != "pykmip" {
		t.Fatalf("key on %q", ref.Provider)
	}
	raw, state, err := h1.GetKey(ctx, ref, "")
	if err != nil || len(raw) != 32 || state != "Active" {
		t.Fatalf("get: %d bytes, %q, %v", len(raw), state, err)
	}
	if err := h1.RegisterVM(ctx, mgrproto.VM{ID: "vm-p", Keys: []mgrproto.KeyRef{ref}}); err != nil {
		t.Fatal(err)
	}
	_, _, err = h2.GetKey(ctx, ref, "")
	refusal(t, err, mgrproto.CodeDenied, `belongs to host "host1"`)
	l.stop()
	l.start()
	raw2, _, err := h1.GetKey(ctx, ref, "vm-p")
	if err != nil || !bytes.Equal(raw, raw2) {
		t.Fatalf("after manager restart: %v (same %v)", err, bytes.Equal(raw, raw2))
	}
}

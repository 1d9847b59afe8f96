package enginetest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// A shallow rekey rewrites the keySafe copy in each extent's header: it
// must refuse a degraded extent, naming it, and leave its bytes alone.
func TestRekeyShallowRefusesDegraded(t *testing.T) {
	ops, kek := newTestOps(t)
	ctx := context.Background()
	dir := vmIn(t, ops, &kek, t.TempDir(), "enc")
	exts, _ := filepath.Glob(filepath.Join(dir, "*-flat.vmdk"))
	if len(exts) != 1 {
		t.Fatalf("extents: %v", exts)
	}
	raw, _ := os.ReadFile(exts[0])
	raw[container.SlotSize-1] ^= 1 // slot 0's MAC
	os.WriteFile(exts[0], raw, 0o600)
	kek2, err := ops.Keys.Create(ctx, "mem", "kek2")
	if err != nil {
		t.Fatal(err)
	}
	err = ops.RekeyShallow(ctx, dir, kek2.Ref)
	if !errors.Is(err, container.ErrDegraded) || !strings.Contains(err.Error(), exts[0]) {
		t.Fatalf("shallow rekey of a degraded extent: %v", err)
	}
	if after, _ := os.ReadFile(exts[0]); !bytes.Equal(after, raw) {
		t.Fatal("the refused rekey changed the degraded extent")
	}
}

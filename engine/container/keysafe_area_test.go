package container

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/internal/testkit"
	"github.com/vmcryptd/vmcryptd/engine/keys"
)

func TestEmbeddedKeySafe(t *testing.T) {
	dek := testkit.MustDEK(t)
	path := filepath.Join(t.TempDir(), "disk.vmdk")
	c, err := CreateContainer(path, dek, CreateOptions{Kind: KindExtent, Binding: keys.Binding{Purpose: keys.PurposeDisk, OwnerID: "d1"}, EmbeddedKeySafe: "vmware:key/list/(first)"})
	if err != nil {
		t.Fatal(err)
	}
	c.WriteAt([]byte("data"), 0)
	c.Close()
	ks, ok, err := ReadEmbeddedKeySafeFile(path)
	if err != nil || !ok || ks != "vmware:key/list/(first)" {
		t.Fatalf("got %q %v %v", ks, ok, err)
	}
	for i, want := range []string{"second", "third", strings.Repeat("x", ksMaxString)} {
		if err := WriteEmbeddedKeySafe(path, want); err != nil {
			t.Fatal(err)
		}
		if ks, ok, _ := ReadEmbeddedKeySafeFile(path); !ok || ks != want {
			t.Fatalf("rewrite %d: got %q", i, ks)
		}
	}
	if err := WriteEmbeddedKeySafe(path, strings.Repeat("x", ksMaxString+1)); err == nil {
		t.Fatal("oversized keySafe accepted")
	}
	// A torn write of the newest copy leaves the previous one.
	raw, _ := os.ReadFile(path)
	_, s0, _ := ParseKSCopy(raw[KsAreaOff:])
	_, s1, _ := ParseKSCopy(raw[KsAreaOff+KsCopySize:])
	newest := 0
	if s1 > s0 {
		newest = 1
	}
	raw[KsAreaOff+newest*KsCopySize+20] ^= 0xff
	os.WriteFile(path, raw, 0o600)
	if ks, ok, _ := ReadEmbeddedKeySafeFile(path); !ok || ks != "third" {
		t.Fatalf("after torn write: %q %v", ks, ok)
	}
	// The container still opens: the area is outside the MAC'd slots.
	c2, err := OpenContainer(path, dek, true, "")
	if err != nil {
		t.Fatal(err)
	}
	c2.Close()
}

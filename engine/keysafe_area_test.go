package engine

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestEmbeddedKeySafe(t *testing.T) {
	dek := mustDEK(t)
	path := filepath.Join(t.TempDir(), "disk.vmdk")
	c, err := CreateContainer(path, dek, CreateOptions{Kind: KindExtent, Binding: Binding{PurposeDisk, "d1"}, EmbeddedKeySafe: "vmware:key/list/(first)"})
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
	_, s0, _ := parseKSCopy(raw[ksAreaOff:])
	_, s1, _ := parseKSCopy(raw[ksAreaOff+ksCopySize:])
	newest := 0
	if s1 > s0 {
		newest = 1
	}
	raw[ksAreaOff+newest*ksCopySize+20] ^= 0xff
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

package keylocator

import (
	"strings"
	"testing"

	"github.com/vmware/govmomi/crypto"
)

// A pair as ESXi writes it (FORMAT.md 4.1 syntax), and a list of one.
const pair = "vmware:key/pair/(fqid/<VMWARE-NULL>/lab/k1,HMAC-SHA-256,AAEC)"

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in  string
		ok  bool
		typ crypto.KeyLocatorType
	}{
		{in: pair, ok: true, typ: crypto.KeyLocatorTypePair},
		{in: "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/lab/k1,HMAC-SHA-256,AAEC))", ok: true, typ: crypto.KeyLocatorTypeList},
		{in: "vmware:key/list/()", ok: true, typ: crypto.KeyLocatorTypeList},
		{in: ""},
		{in: "not a locator"},
		{in: "vmware:key/pair/("},
	} {
		kl, err := Parse(tc.in)
		switch {
		case !tc.ok && err == nil:
			t.Errorf("Parse(%q) = %v, want an error", tc.in, kl)
		case tc.ok && err != nil:
			t.Errorf("Parse(%q): %v", tc.in, err)
		case tc.ok && kl.Type != tc.typ:
			t.Errorf("Parse(%q) type %v, want %v", tc.in, kl.Type, tc.typ)
		}
	}
}

// FuzzParse: no input makes Parse panic, and what parses re-encodes to a
// string that parses to the same type.
func FuzzParse(f *testing.F) {
	for _, s := range []string{pair, "vmware:key/list/()", "vmware:key/fqid/<VMWARE-NULL>/a/b", strings.Repeat("(", 100)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		kl, err := Parse(s)
		if err != nil {
			return
		}
		again, err := Parse(kl.String())
		if err != nil && kl.String() != "" {
			t.Fatalf("re-encoding of %q does not parse: %v", s, err)
		}
		if err == nil && again.Type != kl.Type {
			t.Fatalf("type changed on re-encoding: %v then %v", kl.Type, again.Type)
		}
	})
}

package keys

import (
	"bytes"
	"crypto/rand"
	"strings"
	"testing"
)

func mustKEK(t *testing.T, ref KeyRef, fill byte) *KEK {
	t.Helper()
	raw := bytes.Repeat([]byte{fill}, KEKSize)
	k, err := NewKEK(ref, raw)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Destroy)
	return k
}

func mustDEK(t *testing.T) *DEK {
	t.Helper()
	d, err := NewDEK()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Destroy)
	return d
}

func TestNewKEKTakesOwnership(t *testing.T) {
	raw := bytes.Repeat([]byte{7}, KEKSize)
	k, err := NewKEK(KeyRef{"p", "k"}, raw)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Destroy()
	if !bytes.Equal(raw, make([]byte, KEKSize)) {
		t.Fatal("caller's copy of the KEK not cleared")
	}
	short := []byte{1, 2, 3}
	if _, err := NewKEK(KeyRef{"p", "k"}, short); err == nil || strings.Contains(err.Error(), "\x01\x02\x03") {
		t.Fatalf("short KEK: err = %v", err)
	}
}

func TestNewDEK(t *testing.T) {
	a, b := mustDEK(t), mustDEK(t)
	if len(a.Bytes()) != DEKSize {
		t.Fatalf("DEK is %d bytes", len(a.Bytes()))
	}
	if bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("two DEKs are equal")
	}
	if EqualHalves(a.Bytes()) {
		t.Fatal("DEK halves equal")
	}
	if _, err := DEKFromBytes(bytes.Repeat([]byte{9}, DEKSize)); err == nil {
		t.Fatal("DEK with equal halves accepted")
	}
}

func TestWrapUnwrap(t *testing.T) {
	kek := mustKEK(t, KeyRef{"lab", "key-1"}, 0x11)
	other := mustKEK(t, KeyRef{"lab", "key-2"}, 0x22)
	sameBytesOtherRef := mustKEK(t, KeyRef{"lab", "key-9"}, 0x11)
	dek := mustDEK(t)
	bind := Binding{Purpose: PurposeDisk, OwnerID: "disk-A"}
	locked, err := WrapDEK(kek, dek, bind)
	if err != nil {
		t.Fatal(err)
	}
	if len(locked) != LockedDataLen {
		t.Fatalf("locked data is %d bytes", len(locked))
	}
	if bytes.Contains(locked, dek.Bytes()[:16]) {
		t.Fatal("locked data contains DEK bytes")
	}
	got, err := UnwrapDEK(kek, locked, bind)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), dek.Bytes()) {
		t.Fatal("unwrapped DEK differs")
	}
	got.Destroy()

	flipped := func(i int) []byte {
		c := bytes.Clone(locked)
		c[i] ^= 1
		return c
	}
	bad := []struct {
		name   string
		kek    *KEK
		locked []byte
		bind   Binding
	}{
		{"wrong kek", other, locked, bind},
		{"same key bytes, other key id", sameBytesOtherRef, locked, bind},
		{"other disk", kek, locked, Binding{PurposeDisk, "disk-B"}},
		{"other purpose", kek, locked, Binding{PurposeVM, "disk-A"}},
		{"flipped salt", kek, flipped(5), bind},
		{"flipped ciphertext", kek, flipped(40), bind},
		{"flipped tag", kek, flipped(LockedDataLen - 1), bind},
		{"truncated", kek, locked[:len(locked)-1], bind},
		{"bad version", kek, flipped(0), bind},
		{"empty owner", kek, locked, Binding{PurposeDisk, ""}},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			d, err := UnwrapDEK(tt.kek, tt.locked, tt.bind)
			if err == nil {
				d.Destroy()
				t.Fatal("unwrap succeeded")
			}
			if strings.Contains(err.Error(), string(dek.Bytes()[:8])) {
				t.Fatal("error leaks key bytes")
			}
		})
	}
}

func TestWrapIsRandomized(t *testing.T) {
	kek := mustKEK(t, KeyRef{"lab", "k"}, 0x33)
	dek := mustDEK(t)
	b := Binding{PurposeVM, "vm-1"}
	a1, _ := WrapDEK(kek, dek, b)
	a2, _ := WrapDEK(kek, dek, b)
	if bytes.Equal(a1, a2) {
		t.Fatal("two wraps of the same DEK are identical")
	}
}

func TestKeySafeRoundTrip(t *testing.T) {
	locked1 := make([]byte, LockedDataLen)
	locked2 := make([]byte, LockedDataLen)
	rand.Read(locked1)
	rand.Read(locked2)
	entries := []KeySafeEntry{
		{KEK: KeyRef{"lab-kms", "8c1b2a3e-0000-4f00-9e00-1234567890ab"}, Locked: locked1},
		{KEK: KeyRef{"prod/kms,with(odd)chars", "id with spaces"}, Locked: locked2},
	}
	s, err := EncodeKeySafe(entries)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(s, "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/lab%2dkms/") {
		t.Fatalf("unexpected keySafe syntax: %s", s)
	}
	got, err := DecodeKeySafe(s)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("got %d entries", len(got))
	}
	for i := range entries {
		if got[i].KEK != entries[i].KEK || got[i].Scheme != WrapSchemeName || !bytes.Equal(got[i].Locked, entries[i].Locked) {
			t.Fatalf("entry %d: got %+v", i, got[i])
		}
	}
}

func TestDecodeKeySafeErrors(t *testing.T) {
	for _, s := range []string{
		"",
		"not a locator",
		"vmware:key/fqid/<VMWARE-NULL>/p/k",
		"vmware:key/list/()",
		"vmware:key/list/(pair/(null/<VMWARE-EMPTYSTRING>,HMAC,AAAA))",
	} {
		if _, err := DecodeKeySafe(s); err == nil {
			t.Errorf("DecodeKeySafe(%q) succeeded", s)
		}
	}
}

// ESXi's own keySafe (from govmomi's examples) must at least parse: we
// cannot unwrap it (HMAC-SHA-256 is VMware's scheme) but inspect shows it.
func TestDecodeKeySafeESXi(t *testing.T) {
	const esxi = `vmware:key/list/(pair/(fqid/<VMWARE-NULL>/local/ASEAAgEAIexBYS7MTFOGo6XyS0PZfQEIAAwAEAAgAAQAQUVTLTI1NgCmT8mZIAuAGqLaFVU3pBlaT7%2fzDJm3%2fy%2f05n9y9%2bxv1aVSfBY9e6rBrhvKIkB2G%2fsvF7L%2bLGpoojr136%2bghgEA,HMAC%2dSHA%2d256,kIc7z%2fJowrpzVUAand6fC4ixT5BY6KwNTbAPFQErmxFRkmhJNOTp1VyQFnkn5kLgvKpt7KJKlm%2fvLkO6YxkVe61EMdtdsR2nL9DWMsDWov9syEh%2ftVED%2fzCct1fFpUaqSa29J%2fFk9%2bD22HiA0%2flumBPwt9M5aW0HB9T9lEMxNEVpSOBPmOW63DzLzAq1EC7%2fIWuCimTL%2b15%2be4uwDvxEYI5RDofZ2fm9oyM9MLHDTYPo%2fsFo8GU1LK%2frLsQcj20XijOe%2bfLnDlbJcH1nCmyoO8tweHwDs%2fmwhbpQudvXbGVM3jboiXoPj9rki%2boGeE8clTcBUyRxHE6n56MuZ6HmH1GHt9tBLyAHvk4oj2wNGGc%3d))`
	got, err := DecodeKeySafe(esxi)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].KEK.Provider != "local" || got[0].Scheme != "HMAC-SHA-256" || len(got[0].Locked) != 272 {
		t.Fatalf("got %+v", got)
	}
}

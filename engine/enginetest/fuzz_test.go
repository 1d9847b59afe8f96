package enginetest

import (
	"bytes"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
)

// Fuzz targets for the parsers of untrusted bytes that live in engine/:
// the header slots (FORMAT.md 3.1), the embedded keySafe area (3.4), the
// keySafe string (4.1) and the vmx encryption.data bundle (4.2). Each is
// seeded with values made by the writer under a fixed key, so the fuzzer
// starts from valid encodings and mutates them.

// fuzzDEK is a fixed DEK (distinct halves) for the seeds.
func fuzzDEK(t testing.TB) *keys.DEK {
	raw := make([]byte, keys.DEKSize)
	for i := range raw {
		raw[i] = byte(i*7 + 1)
	}
	d, err := keys.DEKFromBytes(raw)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// FuzzHeaderSlotsNeverAcceptForged: PeekHeader and verifyHeader never
// panic; whatever PeekHeader returns has in-range fields; and verifyHeader
// under the key accepts a slot only if its 512 bytes are exactly ones the
// writer produced (the MAC cannot be forged, so any mutation of an
// authenticated slot is refused or the other slot is used).
func FuzzHeaderSlotsNeverAcceptForged(f *testing.F) {
	dek := fuzzDEK(f)
	defer dek.Destroy()
	ck, err := container.DeriveContainerKeys(dek)
	if err != nil {
		f.Fatal(err)
	}
	defer ck.Destroy()
	known := map[string]bool{}
	mk := func(seq uint64, size int64, slot int) []byte {
		h := &container.Header{Kind: container.KindNVRAM, Seq: seq, Size: size, UnitSize: 4096, PayloadOff: container.HeaderSize,
			FileID: [16]byte{1, 2, 3}, Fingerprint: ck.Fingerprint, Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: "vm-fuzz"}}
		b, err := container.MarshalSlot(h, slot, ck.MacKey.Bytes())
		if err != nil {
			f.Fatal(err)
		}
		known[string(b)] = true
		return b
	}
	region := func(a, b []byte) []byte { return append(append([]byte(nil), a...), b...) }
	f.Add(region(mk(1, 8192, 0), mk(1, 8192, 1)))  // at rest
	f.Add(region(mk(2, 12288, 0), mk(1, 8192, 1))) // interrupted update
	f.Add(region(mk(3, 0, 0), make([]byte, container.SlotSize)))
	f.Add(make([]byte, 2*container.SlotSize))
	f.Fuzz(func(t *testing.T, region []byte) {
		if h, err := container.PeekHeader(region); err == nil {
			if !container.ValidUnitSize(h.UnitSize) || h.PayloadOff != container.HeaderSize || h.Size < 0 || h.Binding.OwnerID == "" {
				t.Fatalf("PeekHeader returned out-of-range fields: %+v", h)
			}
		}
		if len(region) < 2*container.SlotSize {
			return
		}
		h, health, err := container.VerifyHeader(region, ck)
		if err != nil {
			return
		}
		b := region[h.Slot*container.SlotSize : (h.Slot+1)*container.SlotSize]
		if !known[string(b)] {
			t.Fatalf("verifyHeader accepted slot %d that the writer never produced (health %+v)", h.Slot, health)
		}
		if health.Degraded == "" {
			other := region[(1-h.Slot)*container.SlotSize : (2-h.Slot)*container.SlotSize]
			if !known[string(other)] {
				t.Fatalf("header judged healthy but slot %d is not authentic", 1-h.Slot)
			}
		}
	})
}

// FuzzEmbeddedKeySafeRoundTrip: ReadEmbeddedKeySafe never panics, and
// what it returns re-encodes into a copy that reads back the same.
func FuzzEmbeddedKeySafeRoundTrip(f *testing.F) {
	seed := make([]byte, container.HeaderSize)
	for i, seq := range []uint64{4, 5} {
		c, err := container.MarshalKSCopy("vmware:key/list/(pair/(fqid/<VMWARE-NULL>/lab/k1,HMAC-SHA-256,AAEC))", seq)
		if err != nil {
			f.Fatal(err)
		}
		copy(seed[container.KsAreaOff+i*container.KsCopySize:], c)
	}
	f.Add(seed)
	f.Add(seed[:container.KsAreaOff+container.KsCopySize])
	f.Add(make([]byte, container.HeaderSize))
	f.Fuzz(func(t *testing.T, region []byte) {
		ks, ok := container.ReadEmbeddedKeySafe(region)
		if !ok {
			return
		}
		c, err := container.MarshalKSCopy(ks, 9)
		if err != nil {
			t.Fatalf("a keySafe read back (%d bytes) does not re-encode: %v", len(ks), err)
		}
		got, seq, ok := container.ParseKSCopy(c)
		if !ok || got != ks || seq != 9 {
			t.Fatalf("round trip: %q seq %d ok %v, want %q", got, seq, ok, ks)
		}
	})
}

// FuzzKeySafeDecodeRoundTrip: DecodeKeySafe never panics (govmomi's codec
// is behind formats/keylocator), every entry it returns names a provider
// and a key id, and re-encoding the entries decodes to the same entries.
func FuzzKeySafeDecodeRoundTrip(f *testing.F) {
	for _, s := range []string{
		"vmware:key/list/(pair/(fqid/<VMWARE-NULL>/lab/k1,HMAC-SHA-256,AAEC))",
		"vmware:key/pair/(fqid/<VMWARE-NULL>/lab/k1,HMAC-SHA-256,AAEC)",
		"vmware:key/list/(pair/(fqid/<VMWARE-NULL>/a%2fb/k%20,XTS,AA==),pair/(fqid/<VMWARE-NULL>/c/d,HMAC-SHA-256,))",
		"vmware:key/list/(pair/(passphrase/x,HMAC-SHA-256,AA))",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		entries, err := keys.DecodeKeySafe(s)
		if err != nil {
			return
		}
		for _, e := range entries {
			if e.KEK.Provider == "" || e.KEK.KeyID == "" {
				t.Fatalf("decoded an entry without provider or key id: %+v", e)
			}
		}
		enc, err := keys.EncodeKeySafe(entries)
		if err != nil {
			t.Fatalf("decoded entries do not re-encode: %v", err)
		}
		again, err := keys.DecodeKeySafe(enc)
		if err != nil {
			t.Fatalf("re-encoded keySafe %q does not decode: %v", enc, err)
		}
		if len(again) != len(entries) {
			t.Fatalf("round trip changed the entry count: %d then %d", len(entries), len(again))
		}
		for i := range entries {
			a, b := entries[i], again[i]
			if a.KEK != b.KEK || !bytes.Equal(a.Locked, b.Locked) || (a.Scheme != b.Scheme && a.Scheme != "") {
				t.Fatalf("entry %d changed on round trip: %+v then %+v", i, a, b)
			}
		}
	})
}

// FuzzVMXDataOpensOnlyWhatWasSealed: openVMXData never panics and opens
// only bundles sealed under the key for this VM; extractSensitive followed
// by restoreSensitive gives back any vmx text byte for byte.
func FuzzVMXDataOpensOnlyWhatWasSealed(f *testing.F) {
	dek := fuzzDEK(f)
	defer dek.Destroy()
	text := []byte("displayName = \"a\"\nguestinfo.x = \"secret\"\nmachine.id = \"m\"\nmemsize = \"64\"\nannotation = \"n\"")
	_, moved := vmx.ExtractSensitive(text)
	// A fixed nonce: every fuzz worker runs this setup and must get the
	// same bundle as the seed corpus.
	sealed, err := container.SealVMXDataNonce(dek, "vm-fuzz", moved, bytes.Repeat([]byte{7}, 12))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(sealed, text)
	f.Add("AQ==", []byte("guestinfo.a = 1"))
	f.Add("", []byte("\n\nguestinfo.z=\"q\"\r\n# c\n"))
	f.Fuzz(func(t *testing.T, b64 string, text []byte) {
		if got, err := container.OpenVMXData(dek, "vm-fuzz", b64); err == nil {
			if b64 != sealed {
				t.Fatalf("opened a bundle that was never sealed: %q", b64)
			}
			if len(got) != len(moved) {
				t.Fatalf("opened %d lines, sealed %d", len(got), len(moved))
			}
		}
		if _, err := container.OpenVMXData(dek, "vm-other", b64); err == nil {
			t.Fatalf("bundle opened for another VM id")
		}
		rest, mv := vmx.ExtractSensitive(text)
		if back := vmx.RestoreSensitive(rest, mv); !bytes.Equal(back, text) {
			t.Fatalf("extract+restore changed the text:\n%q\nbecame\n%q", text, back)
		}
	})
}

package engine

import (
	"bytes"
	"testing"

	"github.com/vmcryptd/vmcryptd/formats/vmx"
)

// Fuzz targets for the parsers of untrusted bytes that live in engine/:
// the header slots (FORMAT.md 3.1), the embedded keySafe area (3.4), the
// keySafe string (4.1) and the vmx encryption.data bundle (4.2). Each is
// seeded with values made by the writer under a fixed key, so the fuzzer
// starts from valid encodings and mutates them.

// fuzzDEK is a fixed DEK (distinct halves) for the seeds.
func fuzzDEK(t testing.TB) *DEK {
	raw := make([]byte, DEKSize)
	for i := range raw {
		raw[i] = byte(i*7 + 1)
	}
	d, err := dekFromBytes(raw)
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
	keys, err := deriveContainerKeys(dek)
	if err != nil {
		f.Fatal(err)
	}
	defer keys.destroy()
	known := map[string]bool{}
	mk := func(seq uint64, size int64, slot int) []byte {
		h := &Header{Kind: KindNVRAM, Seq: seq, Size: size, UnitSize: 4096, PayloadOff: HeaderSize,
			FileID: [16]byte{1, 2, 3}, Fingerprint: keys.fingerprint, Binding: Binding{Purpose: PurposeVM, OwnerID: "vm-fuzz"}}
		b, err := marshalSlot(h, slot, keys.macKey.Bytes())
		if err != nil {
			f.Fatal(err)
		}
		known[string(b)] = true
		return b
	}
	region := func(a, b []byte) []byte { return append(append([]byte(nil), a...), b...) }
	f.Add(region(mk(1, 8192, 0), mk(1, 8192, 1)))  // at rest
	f.Add(region(mk(2, 12288, 0), mk(1, 8192, 1))) // interrupted update
	f.Add(region(mk(3, 0, 0), make([]byte, slotSize)))
	f.Add(make([]byte, 2*slotSize))
	f.Fuzz(func(t *testing.T, region []byte) {
		if h, err := PeekHeader(region); err == nil {
			if !validUnitSize(h.UnitSize) || h.PayloadOff != HeaderSize || h.Size < 0 || h.Binding.OwnerID == "" {
				t.Fatalf("PeekHeader returned out-of-range fields: %+v", h)
			}
		}
		if len(region) < 2*slotSize {
			return
		}
		h, health, err := verifyHeader(region, keys)
		if err != nil {
			return
		}
		b := region[h.slot*slotSize : (h.slot+1)*slotSize]
		if !known[string(b)] {
			t.Fatalf("verifyHeader accepted slot %d that the writer never produced (health %+v)", h.slot, health)
		}
		if health.Degraded == "" {
			other := region[(1-h.slot)*slotSize : (2-h.slot)*slotSize]
			if !known[string(other)] {
				t.Fatalf("header judged healthy but slot %d is not authentic", 1-h.slot)
			}
		}
	})
}

// FuzzEmbeddedKeySafeRoundTrip: ReadEmbeddedKeySafe never panics, and
// what it returns re-encodes into a copy that reads back the same.
func FuzzEmbeddedKeySafeRoundTrip(f *testing.F) {
	seed := make([]byte, HeaderSize)
	for i, seq := range []uint64{4, 5} {
		c, err := marshalKSCopy("vmware:key/list/(pair/(fqid/<VMWARE-NULL>/lab/k1,HMAC-SHA-256,AAEC))", seq)
		if err != nil {
			f.Fatal(err)
		}
		copy(seed[ksAreaOff+i*ksCopySize:], c)
	}
	f.Add(seed)
	f.Add(seed[:ksAreaOff+ksCopySize])
	f.Add(make([]byte, HeaderSize))
	f.Fuzz(func(t *testing.T, region []byte) {
		ks, ok := ReadEmbeddedKeySafe(region)
		if !ok {
			return
		}
		c, err := marshalKSCopy(ks, 9)
		if err != nil {
			t.Fatalf("a keySafe read back (%d bytes) does not re-encode: %v", len(ks), err)
		}
		got, seq, ok := parseKSCopy(c)
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
		entries, err := DecodeKeySafe(s)
		if err != nil {
			return
		}
		for _, e := range entries {
			if e.KEK.Provider == "" || e.KEK.KeyID == "" {
				t.Fatalf("decoded an entry without provider or key id: %+v", e)
			}
		}
		enc, err := EncodeKeySafe(entries)
		if err != nil {
			t.Fatalf("decoded entries do not re-encode: %v", err)
		}
		again, err := DecodeKeySafe(enc)
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
	sealed, err := sealVMXDataNonce(dek, "vm-fuzz", moved, bytes.Repeat([]byte{7}, 12))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(sealed, text)
	f.Add("AQ==", []byte("guestinfo.a = 1"))
	f.Add("", []byte("\n\nguestinfo.z=\"q\"\r\n# c\n"))
	f.Fuzz(func(t *testing.T, b64 string, text []byte) {
		if got, err := openVMXData(dek, "vm-fuzz", b64); err == nil {
			if b64 != sealed {
				t.Fatalf("opened a bundle that was never sealed: %q", b64)
			}
			if len(got) != len(moved) {
				t.Fatalf("opened %d lines, sealed %d", len(got), len(moved))
			}
		}
		if _, err := openVMXData(dek, "vm-other", b64); err == nil {
			t.Fatalf("bundle opened for another VM id")
		}
		rest, mv := vmx.ExtractSensitive(text)
		if back := vmx.RestoreSensitive(rest, mv); !bytes.Equal(back, text) {
			t.Fatalf("extract+restore changed the text:\n%q\nbecame\n%q", text, back)
		}
	})
}

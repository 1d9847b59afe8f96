package nvram

import (
	"encoding/binary"
	"strings"
	"testing"
)

func TestParseLimits(t *testing.T) {
	entry := func(n int) []byte { // one zero-length entry, repeated n times
		return make([]byte, n*entryHeaderSize)
	}
	store := func(records int) []byte {
		b := make([]byte, storeHeaderSize+records*recordHeader)
		copy(b, storeMagic)
		binary.LittleEndian.PutUint32(b[12:], uint32(len(b)))
		return b
	}
	efi := func(payload []byte) []byte {
		b := append([]byte(Magic), 1, 0, 0, 0)
		b = append(b, "EFI_NV\x00\x00"...)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(payload)))
		return append(b, payload...)
	}
	for _, tc := range []struct {
		name     string
		img      []byte
		err      string // Parse error
		storeErr string // EFI store error
	}{
		{"MRVN and zeros", append([]byte(Magic+"\x01\x00\x00\x00"), entry(MaxEntries+1)...), "more than 1024 entries", ""},
		{"entries at the limit", append([]byte(Magic+"\x01\x00\x00\x00"), entry(MaxEntries)...), "", ""},
		{"too large", append([]byte(Magic+"\x01\x00\x00\x00"), make([]byte, MaxSize)...), "exceeds limit", ""},
		{"too many variables", efi(store(MaxVariables + 1)), "", "more than 16384 variable records"},
		{"variables at the limit", efi(store(MaxVariables)), "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Parse(tc.img)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var serr error
			for _, e := range f.Entries {
				if e.StoreErr != nil {
					serr = e.StoreErr
				}
			}
			if (tc.storeErr == "") != (serr == nil) || serr != nil && !strings.Contains(serr.Error(), tc.storeErr) {
				t.Fatalf("store error %v, want %q", serr, tc.storeErr)
			}
		})
	}
}

package nvram

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
)

// entry builds a raw top-level entry.
func entry(name, sub string, data []byte) []byte {
	b := make([]byte, 12, 12+len(data))
	copy(b, name)
	copy(b[4:], sub)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(data)))
	return append(b, data...)
}

func file(entries ...[]byte) []byte {
	b := []byte("MRVN\x01\x00\x00\x00")
	for _, e := range entries {
		b = append(b, e...)
	}
	return b
}

// biosLike imitates a BIOS-era file: CMOS and other opaque entries.
func biosLike() []byte {
	return file(
		entry("CMOS", "timA", bytes.Repeat([]byte{0x26}, 128)),
		entry("CMOS", "CMOS", bytes.Repeat([]byte{0x00, 0x80}, 64)),
		entry("ESCD", "\x00\x00\x00\x00", []byte("opaque ESCD data")),
	)
}

func TestNewDefault(t *testing.T) {
	img, err := New(0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(img) != DefaultSize {
		t.Fatalf("size %d, want %d", len(img), DefaultSize)
	}
	f, err := Parse(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.Bytes(), img) {
		t.Fatal("round trip differs")
	}
	s := f.EFIStore()
	if s == nil || len(s.Vars) != 3 {
		t.Fatalf("store %+v", s)
	}
	v := s.Get(EFIGlobalVariable, "PlatformLang")
	if v == nil || string(v.Value) != "en-US\x00" || v.Attributes != 7 {
		t.Errorf("PlatformLang = %+v", v)
	}
	if got := f.Entries[0].Label(); got != "EFI_/NV" {
		t.Errorf("label %q", got)
	}
	// Layout facts a real parser relies on.
	if string(img[20:28]) != "VMWNVRAM" || binary.LittleEndian.Uint32(img[32:]) != uint32(s.Used()) || img[len(img)-1] != 0xff {
		t.Errorf("unexpected layout: % x", img[:40])
	}
}

func TestRoundTrip(t *testing.T) {
	efi, _ := New(16384, append(DefaultVariables(),
		NewVariable(MustParseGUID("7c436110-ab2a-4bbb-a880-fe41995c9f82"), "boot-args", 7, []byte("-v")),
		NewVariable(EFIGlobalVariable, "BootOrder", 7, []byte{0, 0, 1, 0}),
		NewVariable(EFIGlobalVariable, "BootOrder", 7, []byte{1, 0}), // append-log duplicate
	))
	broken := file(entry("EFI_", "NV\x00\x00", []byte("VMWNVRAM\x00\x00\x00\x00\xff\xff\x00\x00junk")))
	for name, img := range map[string][]byte{
		"efi":             efi,
		"bios":            biosLike(),
		"header only":     file(),
		"trailer":         append(biosLike(), 1, 2, 3, 4, 5),
		"truncated entry": append(biosLike(), entry("XXXX", "YYYY", make([]byte, 100))[:50]...),
		"broken store":    broken,
		"efi then bios":   append(efi, biosLike()[8:]...),
	} {
		t.Run(name, func(t *testing.T) {
			f, err := Parse(img)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(f.Bytes(), img) {
				t.Fatal("round trip differs")
			}
		})
	}
	f, _ := Parse(broken)
	if f.Entries[0].StoreErr == nil || f.Entries[0].Store != nil {
		t.Error("broken store not reported")
	}
	f, _ = Parse(efi)
	if v := f.EFIStore().Get(EFIGlobalVariable, "BootOrder"); !bytes.Equal(v.Value, []byte{1, 0}) {
		t.Errorf("last BootOrder record should win, got % x", v.Value)
	}
	f, _ = Parse(append(biosLike(), 1, 2, 3))
	if len(f.Entries) != 3 || f.EFIStore() != nil || len(f.Trailer) != 3 {
		t.Errorf("bios parse: %d entries, trailer %d", len(f.Entries), len(f.Trailer))
	}
}

func TestModify(t *testing.T) {
	img, _ := New(0, nil)
	f, _ := Parse(img)
	s := f.EFIStore()
	s.Set(EFIGlobalVariable, "Timeout", 7, []byte{5, 0})
	s.Set(EFIGlobalVariable, "SecureBoot", 6, []byte{1})
	if n := s.Delete(EFIGlobalVariable, "Lang"); n != 1 {
		t.Errorf("Delete = %d", n)
	}
	out := f.Bytes()
	if len(out) != len(img) {
		t.Errorf("size changed %d -> %d", len(img), len(out))
	}
	g, err := Parse(out)
	if err != nil {
		t.Fatal(err)
	}
	s2 := g.EFIStore()
	if v := s2.Get(EFIGlobalVariable, "Timeout"); v == nil || !bytes.Equal(v.Value, []byte{5, 0}) {
		t.Errorf("Timeout %+v", v)
	}
	if s2.Get(EFIGlobalVariable, "Lang") != nil || s2.Get(EFIGlobalVariable, "SecureBoot") == nil {
		t.Error("delete/append lost")
	}
	// Growing past the entry's size grows the file.
	s2.Set(EFIGlobalVariable, "Big", 7, make([]byte, 10000))
	g2, err := Parse(g.Bytes())
	if err != nil || len(g2.EFIStore().Get(EFIGlobalVariable, "Big").Value) != 10000 {
		t.Errorf("grown store: %v", err)
	}
}

func TestNewErrors(t *testing.T) {
	if _, err := New(30, nil); err == nil || !strings.Contains(err.Error(), "too small") {
		t.Errorf("err = %v", err)
	}
	if _, err := Parse([]byte("NVRM\x01\x00\x00\x00")); err == nil {
		t.Error("bad magic accepted")
	}
}

func TestGUID(t *testing.T) {
	const s = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
	g := MustParseGUID(s)
	if g.String() != s {
		t.Errorf("String = %s", g)
	}
	// On-disk order is mixed endian.
	if !bytes.Equal(g[:8], []byte{0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11}) {
		t.Errorf("bytes % x", g[:])
	}
	for _, bad := range []string{"", "8be4df61-93ca-11d2-aa0d-00e098032b8", "zzzzzzzz-93ca-11d2-aa0d-00e098032b8c"} {
		if _, err := ParseGUID(bad); err == nil {
			t.Errorf("ParseGUID(%q) accepted", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	img, _ := New(0, nil)
	f.Add(img)
	f.Add(biosLike())
	f.Add(file(entry("EFI_", "NV\x00\x00", []byte("VMWNVRAM\x00\x00\x00\x00\x10\x00\x00\x00"))))
	f.Fuzz(func(t *testing.T, b []byte) {
		file, err := Parse(b)
		if err != nil {
			return
		}
		if !bytes.Equal(file.Bytes(), b) {
			t.Fatal("round trip differs")
		}
		if s := file.EFIStore(); s != nil {
			for _, v := range s.Vars {
				v.Name()
				_ = v.GUID.String()
			}
			s.Set(EFIGlobalVariable, "Fuzz", 7, []byte{1})
			g, err := Parse(file.Bytes())
			if err != nil || g.EFIStore() == nil || g.EFIStore().Get(EFIGlobalVariable, "Fuzz") == nil {
				t.Fatalf("modified store does not re-parse: %v", err)
			}
		}
	})
}

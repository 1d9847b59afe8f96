package vmdk

import (
	"strings"
	"testing"
)

func TestNewFlatDescriptor(t *testing.T) {
	for _, tc := range []struct {
		name    string
		extent  string
		size    int64
		wantErr string
		cyl     string
	}{
		{"1 GiB", "d-flat.vmdk", 1 << 30, "", "130"},
		{"huge", "d-flat.vmdk", 62 << 40, "", "65535"},
		{"one sector", "d-flat.vmdk", 512, "", "0"},
		{"zero", "d-flat.vmdk", 0, "not a positive multiple of 512", ""},
		{"ragged", "d-flat.vmdk", 1000, "not a positive multiple of 512", ""},
		{"quote", `d".vmdk`, 512, "not a plain file name", ""},
		{"slash", "../d.vmdk", 512, "not a plain file name", ""},
		{"empty", "", 512, "not a plain file name", ""},
	} {
		b, err := NewFlatDescriptor(tc.extent, tc.size, 0xdeadbeef)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: err %v, want %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if !IsDescriptorText(b) {
			t.Errorf("%s: not descriptor text", tc.name)
		}
		d, err := ParseDescriptor(b)
		if err != nil {
			t.Fatalf("%s: does not parse: %v", tc.name, err)
		}
		ext := d.Extents()
		if d.CreateType() != "monolithicFlat" || len(ext) != 1 || ext[0].Filename != tc.extent || ext[0].Sectors != tc.size/512 {
			t.Errorf("%s: parsed %q %+v", tc.name, d.CreateType(), ext)
		}
		if cid, err := d.CID(); err != nil || cid != 0xdeadbeef {
			t.Errorf("%s: CID %x %v", tc.name, cid, err)
		}
		if got, _ := d.Get("ddb.geometry.cylinders"); got != tc.cyl {
			t.Errorf("%s: cylinders %q, want %q", tc.name, got, tc.cyl)
		}
	}
}

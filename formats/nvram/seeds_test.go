package nvram

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestGenerateFuzzSeeds rewrites testdata/fuzz/FuzzParse. It runs only
// with VMCRYPTD_GEN_SEEDS=1 so the committed corpus stays stable.
func TestGenerateFuzzSeeds(t *testing.T) {
	if os.Getenv("VMCRYPTD_GEN_SEEDS") != "1" {
		t.Skip("set VMCRYPTD_GEN_SEEDS=1 to regenerate the fuzz seed corpus")
	}
	efi, _ := New(0, nil)
	small, _ := New(256, []*Variable{NewVariable(EFIGlobalVariable, "BootOrder", 7, []byte{0, 0})})
	f, _ := Parse(efi)
	f.EFIStore().Set(EFIGlobalVariable, "Timeout", 7, []byte{5, 0})
	seeds := map[string][]byte{
		"efi-default":  efi,
		"efi-small":    small,
		"efi-modified": f.Bytes(),
		"bios":         biosLike(),
		"trailer":      append(biosLike(), 1, 2, 3),
	}
	for name, b := range seeds {
		p := filepath.Join("testdata", "fuzz", "FuzzParse", name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

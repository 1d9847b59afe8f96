package vmx

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestGenerateFuzzSeeds rewrites testdata/fuzz/FuzzParse. It runs only
// with VMCRYPTD_GEN_SEEDS=1 so the committed corpus stays stable.
func TestGenerateFuzzSeeds(t *testing.T) {
	if os.Getenv("VMCRYPTD_GEN_SEEDS") != "1" {
		t.Skip("set VMCRYPTD_GEN_SEEDS=1 to regenerate the fuzz seed corpus")
	}
	seeds := map[string]string{
		"vmx":      sampleVMX,
		"vmx-crlf": strings.ReplaceAll(sampleVMX, "\n", "\r\n"),
		"vmsd":     sampleVMSD,
		"keysafe":  "encryption.keySafe = \"vmware:key/list/(pair/(fqid/<VMWARE-NULL>/kms/key%2d1,HMAC%2dSHA%2d256,AAEC))\"\nencryption.data = \"QUJD\"\n",
	}
	for name, s := range seeds {
		p := filepath.Join("testdata", "fuzz", "FuzzParse", name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

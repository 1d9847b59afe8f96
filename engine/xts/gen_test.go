package xts

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestGeneratedAssemblyUpToDate re-runs the avo generator (the go:generate
// command in gen.go, into a temporary directory) and requires the committed
// xts_amd64.s and xts_amd64_stubs.go to match byte for byte.
func TestGeneratedAssemblyUpToDate(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles and runs the generator; skipped with -short")
	}
	if runtime.GOARCH != "amd64" {
		t.Skip("the generated files are amd64 only")
	}
	goBin := "go"
	if root, err := exec.Command("go", "env", "GOROOT").Output(); err == nil {
		if p := filepath.Join(strings.TrimSpace(string(root)), "bin", "go"); statOK(p) {
			goBin = p
		}
	}
	dir := t.TempDir()
	cmd := exec.Command(goBin, "run", "-tags", "asmgen", "./internal/asmgen",
		"-out", "xts_amd64.s", "-stubs", "xts_amd64_stubs.go", "-pkg", "xts")
	cmd.Env = append(os.Environ(), "XTS_ASMGEN_OUTDIR="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "missing go.sum entry") {
			t.Skipf("avo's dependencies are not in go.sum, cannot run the generator:\n%s", out)
		}
		t.Fatalf("generator failed: %v\n%s", err, out)
	}
	for _, name := range []string{"xts_amd64.s", "xts_amd64_stubs.go"} {
		want, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: run go generate in engine/xts", name)
		}
	}
}

func statOK(p string) bool { _, err := os.Stat(p); return err == nil }

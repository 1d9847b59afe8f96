package enginetest

import (
	"os"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// NoTemps fails t if a conversion left a temporary file in dir.
func noTemps(t *testing.T, dir string) {
	t.Helper()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if container.IsTempName(e.Name()) {
			t.Fatalf("temporary file %s left behind", e.Name())
		}
	}
}

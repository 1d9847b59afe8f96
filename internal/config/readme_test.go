package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The README's configuration example must load as written.
func TestREADMEExample(t *testing.T) {
	raw, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(raw), "## Configuration\n\n```toml\n")
	if !ok {
		t.Fatal("README has no configuration example")
	}
	example, _, ok := strings.Cut(rest, "```")
	if !ok {
		t.Fatal("unterminated configuration example")
	}
	p := filepath.Join(t.TempDir(), "vmcryptd.toml")
	if err := os.WriteFile(p, []byte(example), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(p)
	if err != nil {
		t.Fatalf("README example: %v", err)
	}
	if c.MetricsListen == "" || len(c.MountRoots) != 1 || len(c.Mounts) != 1 || len(c.KMS) != 1 || len(c.Roles) != 1 {
		t.Fatalf("README example loaded incompletely: %+v", c)
	}
}

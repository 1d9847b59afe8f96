package config

import (
	"path/filepath"
	"testing"
)

// The example shipped as /etc/vmcryptd/vmcryptd.toml must load as written
// and say what its comments promise.
func TestShippedExample(t *testing.T) {
	c, err := Load(abs(t, "../../etc/vmcryptd/vmcryptd.toml"))
	if err != nil {
		t.Fatalf("shipped example: %v", err)
	}
	checks := []struct {
		what      string
		got, want string
	}{
		{"socket", c.Socket, DefaultSocket},
		{"state_dir", c.StateDir, DefaultStateDir},
		{"audit_log", c.AuditLog, "/var/log/vmcryptd/audit.log"},
		{"default_provider", c.DefaultProvider, "corp"},
		{"kms ca_file (relative to the file)", c.KMS[0].CAFile, abs(t, "../../etc/vmcryptd/kms-ca.pem")},
		{"datastore", c.Datastores[0].Path, "/srv/vmcryptd/ds1"},
		{"mount", c.Mounts[0].Mountpoint, "/mnt/vmcryptd/ds1"},
		{"role", c.Roles[0].Role, "NoCryptoAdmin"},
	}
	for _, tc := range checks {
		if tc.got != tc.want {
			t.Errorf("%s = %q, want %q", tc.what, tc.got, tc.want)
		}
	}
	if c.KeyRetryInterval.Seconds() != 10 {
		t.Errorf("key_retry_interval = %v", c.KeyRetryInterval)
	}
}

func abs(t *testing.T, p string) string {
	t.Helper()
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

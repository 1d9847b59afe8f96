package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(body string) string {
		p := filepath.Join(dir, "c.toml")
		os.WriteFile(p, []byte(body), 0o600)
		return p
	}
	good := `
socket = "run/v.sock"
state_dir = "state"
key_retry_interval = "2s"
[[kms]]
name = "lab"
servers = ["127.0.0.1:5696"]
ca_file = "kms/ca.pem"
cert_file = "/abs/client.pem"
key_file = "kms/client-key.pem"
timeout = "3s"
tls_cipher_suites = ["TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", "TLS_RSA_WITH_AES_128_CBC_SHA256"]
[[datastores]]
name = "ds"
path = "ds"
[[roles]]
group = "ops"
role = "NoCryptoAdmin"
`
	c, err := Load(write(good))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.KMS[0].TLSCipherSuites) != 2 || c.KMS[0].TLSCipherSuites[1] != "TLS_RSA_WITH_AES_128_CBC_SHA256" {
		t.Fatalf("tls_cipher_suites: %q", c.KMS[0].TLSCipherSuites)
	}
	if c.Socket != filepath.Join(dir, "run/v.sock") || c.KMS[0].CAFile != filepath.Join(dir, "kms/ca.pem") || c.KMS[0].CertFile != "/abs/client.pem" {
		t.Fatalf("relative paths not resolved: %+v", c)
	}
	if c.DefaultProvider != "lab" || c.AuditLog != filepath.Join(dir, "state", "audit.log") || c.KeyRetryInterval != 2*time.Second || c.KMS[0].Timeout != 3*time.Second {
		t.Fatalf("defaults: %+v", c)
	}
	// Round trip through Write (what `lab up` does).
	out := filepath.Join(dir, "out.toml")
	if err := Write(out, c); err != nil {
		t.Fatal(err)
	}
	c2, err := Load(out)
	if err != nil {
		t.Fatal(err)
	}
	if c2.KeyRetryInterval != c.KeyRetryInterval || c2.KMS[0].Timeout != c.KMS[0].Timeout || c2.Socket != c.Socket || len(c2.KMS[0].TLSCipherSuites) != 2 {
		t.Fatalf("round trip: %+v", c2)
	}

	// [manager] instead of [[kms]]: paths resolved, default_provider is
	// the manager's to check, and it survives Write.
	mc, err := Load(write("default_provider = \"theirs\"\n[manager]\naddress = \"127.0.0.1:5697\"\nca_file = \"m/ca.pem\"\ncert_file = \"m/host.pem\"\nkey_file = \"/k.pem\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if mc.Manager.CAFile != filepath.Join(dir, "m/ca.pem") || mc.Manager.KeyFile != "/k.pem" || len(mc.KMS) != 0 {
		t.Fatalf("[manager]: %+v", mc.Manager)
	}
	if err := Write(out, mc); err != nil {
		t.Fatal(err)
	}
	if mc2, err := Load(out); err != nil || *mc2.Manager != *mc.Manager {
		t.Fatalf("[manager] round trip: %+v %v", mc2, err)
	}

	bad := []struct{ name, body, want string }{
		{"unknown key", "sockett = \"x\"\n", "unknown key"},
		{"dup provider", "[[kms]]\nname=\"a\"\n[[kms]]\nname=\"a\"\n", "defined twice"},
		{"bad default", "default_provider = \"zz\"\n", "not a configured"},
		{"role without subject", "[[roles]]\nrole = \"ReadOnly\"\n", "exactly one of"},
		{"bad duration", "key_retry_interval = \"soon\"\n", "soon"},
		{"datastore without path", "[[datastores]]\nname = \"x\"\n", "needs name and path"},
		{"manager and kms", "[manager]\naddress=\"127.0.0.1:5697\"\nca_file=\"c\"\ncert_file=\"h\"\nkey_file=\"k\"\n[[kms]]\nname=\"a\"\n", "exclusive"},
		{"manager incomplete", "[manager]\naddress=\"127.0.0.1:5697\"\n", "needs address, ca_file, cert_file and key_file"},
		{"manager bad address", "[manager]\naddress=\"nowhere\"\nca_file=\"c\"\ncert_file=\"h\"\nkey_file=\"k\"\n", "address \"nowhere\""},
		{"unknown cipher suite", "[[kms]]\nname=\"a\"\ntls_cipher_suites = [\"TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256\", \"TLS_NOPE\"]\n", `key provider "a": tls_cipher_suites: unknown suite "TLS_NOPE"`},
	}
	for _, b := range bad {
		if _, err := Load(write(b.body)); err == nil || !strings.Contains(err.Error(), b.want) {
			t.Errorf("%s: err = %v, want %q", b.name, err, b.want)
		}
	}
}

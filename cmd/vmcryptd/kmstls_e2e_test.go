package main

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/kms/kmstest"
)

// TestKMSAddTLSCipherSuite: issue 11 item 10 through the daemon. A key
// provider added with `kms add` for a pykmip-server with RSA-2048
// certificates: without --tls-cipher-suite its key create fails with the
// handshake hint; with it, key create works, kms status names the suite,
// and the setting survives a daemon restart (saved state). An unknown
// suite name is refused.
func TestKMSAddTLSCipherSuite(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	srv := kmstest.StartPyKMIPWith(t, kmstest.Options{RSA: true})
	d := newPKDaemon(t, startLabKMS(t, "lab"), "10s")
	d.start()
	add := func(name string, extra ...string) runResult {
		return d.run(append([]string{"kms", "add", name, "--server", srv.Addr, "--ca", srv.CAFile, "--cert", srv.CertFile, "--key", srv.KeyFile}, extra...)...)
	}
	if r := add("bad", "--tls-cipher-suite", "TLS_NOPE"); r.code == 0 || !strings.Contains(r.err, `unknown suite "TLS_NOPE"`) {
		t.Fatalf("kms add with an unknown suite: exit %d: %s", r.code, r.err)
	}
	if r := add("plain"); r.code != 0 {
		t.Fatalf("kms add plain: %s", r.err)
	}
	r := d.run("key", "create", "--provider", "plain")
	if r.code == 0 || !strings.Contains(r.err, "handshake failure") || !strings.Contains(r.err, "tls_cipher_suites") {
		t.Fatalf("key create on an RSA PyKMIP without suites: exit %d: %s", r.code, r.err)
	}
	const suite = "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256"
	if r := add("rsa", "--tls-cipher-suite", suite); r.code != 0 {
		t.Fatalf("kms add rsa: %s", r.err)
	}
	for round := range 2 {
		out := strings.TrimSpace(d.must("key", "create", "--provider", "rsa"))
		if !strings.HasPrefix(out, "rsa/") {
			t.Fatalf("key create: %q", out)
		}
		var ps []api.ProviderStatus
		raw := d.must("kms", "status", "rsa", "--json")
		if err := json.Unmarshal([]byte(raw), &ps); err != nil {
			t.Fatalf("kms status --json: %v\n%s", err, raw)
		}
		if len(ps) != 1 || len(ps[0].Servers) != 1 || ps[0].Servers[0].CipherSuite != suite {
			t.Fatalf("kms status (round %d): %s", round, raw)
		}
		d.restart()
	}
}

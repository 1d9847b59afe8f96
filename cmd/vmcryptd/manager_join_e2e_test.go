package main

import (
	"bytes"
	"context"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

// TestManagerHostJoinCSR: `host join` makes the key pair and CSR on the
// host; `manager host add --csr` signs it without ever seeing the key;
// the joined host is served keys. A CSR for another name, or with a
// broken signature, is refused and audited, and adds no host.
func TestManagerHostJoinCSR(t *testing.T) {
	dir := startLab(t, "--hosts", "1", "--key-retry", "1s")
	msock := filepath.Join(dir, "manager", "manager.sock")
	jd := filepath.Join(t.TempDir(), "host9")
	mustRun(t, "host", "join", "host9", "--out", jd)
	keyBefore, err := os.ReadFile(filepath.Join(jd, "host-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(filepath.Join(jd, "host-key.pem")); fi.Mode().Perm() != 0o600 {
		t.Fatalf("host-key.pem mode %v", fi.Mode().Perm())
	}
	if r := vmcryptd(t, nil, nil, "host", "join", "host9", "--out", jd); r.code == 0 || !strings.Contains(r.err, "refusing to replace") {
		t.Fatalf("second host join over an existing key: exit %d %s", r.code, r.err)
	}
	csr := filepath.Join(jd, "host.csr")

	// Refusals first: wrong name, broken signature.
	r := vmcryptd(t, nil, nil, "manager", "host", "add", "host8", "--csr", csr, "--out", t.TempDir(), "--manager-socket", msock)
	if r.code == 0 || !strings.Contains(r.err, `for CN "host9", not "host8"`) {
		t.Fatalf("CSR for another name: exit %d %s", r.code, r.err)
	}
	raw, _ := os.ReadFile(csr)
	block, _ := pem.Decode(raw)
	block.Bytes[len(block.Bytes)-5] ^= 0xff
	bad := filepath.Join(t.TempDir(), "bad.csr")
	os.WriteFile(bad, pem.EncodeToMemory(block), 0o644)
	r = vmcryptd(t, nil, nil, "manager", "host", "add", "host9", "--csr", bad, "--out", t.TempDir(), "--manager-socket", msock)
	if r.code == 0 || !strings.Contains(r.err, "signature") {
		t.Fatalf("CSR with a broken signature: exit %d %s", r.code, r.err)
	}
	if out := mustRun(t, "manager", "host", "list", "--manager-socket", msock); strings.Contains(out, "host8") || strings.Contains(out, "host9") {
		t.Fatalf("a refused CSR added a host:\n%s", out)
	}

	out := mustRun(t, "manager", "host", "add", "host9", "--csr", csr, "--out", jd, "--manager-socket", msock)
	if !strings.Contains(out, "host host9 added") {
		t.Fatalf("host add --csr: %s", out)
	}
	keyAfter, _ := os.ReadFile(filepath.Join(jd, "host-key.pem"))
	if !bytes.Equal(keyBefore, keyAfter) {
		t.Fatal("host add --csr replaced the host's key")
	}
	var sec struct{ Manager mgrproto.Config }
	if _, err := toml.DecodeFile(filepath.Join(jd, "manager.toml"), &sec); err != nil {
		t.Fatal(err)
	}
	if sec.Manager.KeyFile != filepath.Join(jd, "host-key.pem") {
		t.Fatalf("manager.toml key_file %q", sec.Manager.KeyFile)
	}
	cl, err := mgrproto.NewClient(sec.Manager)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	hello, err := cl.Hello(ctx, mgrproto.HostStatus{Version: "test"})
	if err != nil || hello.Host != "host9" {
		t.Fatalf("hello of the joined host: %+v %v", hello, err)
	}
	ref, err := cl.CreateKey(ctx, "", "joined-key")
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := cl.GetKey(ctx, ref, "")
	if err != nil || len(key) != 32 {
		t.Fatalf("joined host get_key: %d bytes, %v", len(key), err)
	}
	clear(key)

	audit, _ := os.ReadFile(filepath.Join(dir, "manager", "audit.log"))
	var denied, signed bool
	for _, line := range strings.Split(string(audit), "\n") {
		if strings.Contains(line, `"op":"manager.host.add"`) && strings.Contains(line, `"result":"denied"`) && strings.Contains(line, "CSR refused") {
			denied = true
		}
		if strings.Contains(line, `"op":"manager.host.add"`) && strings.Contains(line, `"result":"ok"`) && strings.Contains(line, "signed from the host's CSR") {
			signed = true
		}
	}
	if !denied || !signed {
		t.Errorf("audit log: CSR refusal %v, CSR signing %v", denied, signed)
	}
	if bytes.Contains(audit, bytes.TrimSpace(keyBefore)[40:80]) {
		t.Error("the audit log holds the host key")
	}
}

package labkms

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/kms"
)

// pykmipClientScript drives PyKMIP's own client (kmip.pie ProxyKmipClient)
// against the lab KMS. It prints only key fingerprints (SHA-256 of the key),
// never key bytes. Modes:
//
//	create: create + activate + get an AES-256 key, check it, print
//	        "CREATED <uid> <sha256>"
//	check:  get key <uid1>, print "GOT <uid1> <sha256>"; then revoke and
//	        destroy key <uid2>, print "RETIRED <uid2> <state>"
const pykmipClientScript = `
import hashlib, sys
from kmip.core import enums
from kmip.pie.client import ProxyKmipClient

mode, host, port, cert, key, ca = sys.argv[1:7]
args = sys.argv[7:]

client = ProxyKmipClient(hostname=host, port=int(port), cert=cert, key=key, ca=ca,
                         ssl_version="PROTOCOL_TLSv1_2", config_file="/dev/null",
                         kmip_version=enums.KMIPVersion.KMIP_1_2)

def fingerprint(obj):
    assert obj.cryptographic_algorithm == enums.CryptographicAlgorithm.AES, obj.cryptographic_algorithm
    assert obj.cryptographic_length == 256, obj.cryptographic_length
    assert len(obj.value) == 32, len(obj.value)
    return hashlib.sha256(obj.value).hexdigest()

with client:
    if mode == "create":
        uid = client.create(enums.CryptographicAlgorithm.AES, 256, name="from-pykmip",
                            cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT,
                                                      enums.CryptographicUsageMask.DECRYPT])
        client.activate(uid)
        fp = fingerprint(client.get(uid))
        _, attrs = client.get_attributes(uid, ["State", "Name"])
        names = {a.attribute_name.value: a.attribute_value for a in attrs}
        assert names["State"].value == enums.State.ACTIVE, names["State"]
        found = client.locate(attributes=[client.attribute_factory.create_attribute(
            enums.AttributeType.NAME, "from-pykmip")])
        assert uid in found, found
        print("CREATED", uid, fp)
    elif mode == "check":
        print("GOT", args[0], fingerprint(client.get(args[0])))
        client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, args[1])
        client.destroy(args[1])
        _, attrs = client.get_attributes(args[1], ["State"])
        print("RETIRED", args[1], attrs[0].attribute_value.value.name)
    elif mode == "register":
        # No usage mask: what once poisoned the store (issue 11 item 6).
        import os
        from kmip.pie import objects
        try:
            uid = client.register(objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 256, os.urandom(32)))
            print("REGISTERED", uid)
        except Exception as e:
            print("REFUSED", type(e).__name__, str(e).replace("\n", " "))
    else:
        sys.exit("unknown mode " + mode)
`

// python3WithPyKMIP finds a python3 that can import PyKMIP. Debian's
// python3-pykmip installs into /usr/bin/python3's tree, which is not always
// the python3 first on PATH (pyenv and friends), so that one is tried first.
func python3WithPyKMIP(t *testing.T) string {
	t.Helper()
	var err error
	candidates := []string{"/usr/bin/python3"}
	if py, lerr := exec.LookPath("python3"); lerr == nil {
		candidates = append(candidates, py)
	}
	for _, py := range candidates {
		if err = exec.Command(py, "-c", "import kmip.pie.client").Run(); err == nil {
			return py
		}
	}
	{
		msg := fmt.Sprintf("python3 with the kmip module (PyKMIP) unavailable: %v", err)
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s (CI=true: a missing peer is a failure; apt-get install -y python3-pykmip)", msg)
		}
		t.Skipf("%s; skipping (apt-get install -y python3-pykmip to run it)", msg)
	}
	return ""
}

// TestPyKMIPClient: PyKMIP's ProxyKmipClient creates, activates, gets and
// locates an AES-256 key on the lab KMS, our provider reads the same key,
// PyKMIP reads a key our provider created, then PyKMIP revokes and
// destroys its key.
func TestPyKMIPClient(t *testing.T) {
	py := python3WithPyKMIP(t)
	s := start(t, initDir(t))
	p := s.Paths()
	script := filepath.Join(t.TempDir(), "pykmip_client.py")
	if err := os.WriteFile(script, []byte(pykmipClientScript), 0o600); err != nil {
		t.Fatal(err)
	}
	host, port, _ := strings.Cut(s.Addr(), ":")
	run := func(mode string, args ...string) [][]string {
		t.Helper()
		c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(c, py, append([]string{"-W", "ignore", script, mode, host, port, p.ClientCert, p.ClientKey, p.CACert}, args...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("pykmip client %s: %v\nstdout: %s\nstderr: %s", mode, err, out, stderr.String())
		}
		var lines [][]string
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			lines = append(lines, strings.Fields(l))
		}
		return lines
	}
	fingerprint := func(k []byte) string {
		sum := sha256.Sum256(k)
		return hex.EncodeToString(sum[:])
	}

	out := run("create")
	created := out[len(out)-1]
	if len(created) != 3 || created[0] != "CREATED" {
		t.Fatalf("create: %v", out)
	}
	uid, fp := created[1], created[2]
	t.Logf("PyKMIP created, activated, got and located key %s", uid)

	cfg := p.ProviderConfig("lab", s.Addr())
	prov, err := kms.New(cfg, quiet())
	if err != nil {
		t.Fatal(err)
	}
	defer prov.Close()
	ctx := ctx(t)
	k, err := prov.GetKey(ctx, uid)
	if err != nil {
		t.Fatalf("provider GetKey of the PyKMIP-created key: %v", err)
	}
	if fingerprint(k) != fp {
		t.Fatal("PyKMIP and the provider see different key material")
	}

	ours, err := prov.CreateKey(ctx, "from-vmcryptd")
	if err != nil {
		t.Fatal(err)
	}
	ourKey, err := prov.GetKey(ctx, ours)
	if err != nil {
		t.Fatal(err)
	}
	out = run("check", ours, uid)
	if len(out) < 2 {
		t.Fatalf("check: %v", out)
	}
	got, retired := out[len(out)-2], out[len(out)-1]
	if len(got) != 3 || got[0] != "GOT" || got[1] != ours || got[2] != fingerprint(ourKey) {
		t.Fatalf("PyKMIP get of our key: %v", got)
	}
	if len(retired) != 3 || retired[0] != "RETIRED" || retired[2] != "DESTROYED" {
		t.Fatalf("retire: %v", retired)
	}
	t.Logf("PyKMIP read our key %s, revoked and destroyed its key %s", ours, uid)
	if st, err := prov.KeyState(ctx, uid); err != nil || st != kms.StateDestroyed {
		t.Fatalf("state after PyKMIP destroy: %v %v", st, err)
	}

	// PyKMIP's register() without a usage mask sends a mask of 0: refused
	// with a KMIP error, and the store still loads at the next start.
	out = run("register")
	reg := out[len(out)-1]
	t.Logf("PyKMIP register without usage mask: %v", reg)
	if len(reg) < 2 || reg[0] != "REFUSED" || !strings.Contains(strings.Join(reg, " "), "usage mask of 0") {
		t.Fatalf("register without usage mask: %v, want a refusal naming the mask", reg)
	}
	prov.Close()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := start(t, p.Dir)
	prov2, err := kms.New(p.ProviderConfig("lab", s2.Addr()), quiet())
	if err != nil {
		t.Fatal(err)
	}
	defer prov2.Close()
	if k, err := prov2.GetKey(ctx, ours); err != nil || fingerprint(k) != fingerprint(ourKey) {
		t.Fatalf("our key after restart: %v", err)
	}
}

package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"strings"
	"testing"
)

func TestCheckClientCSR(t *testing.T) {
	good, _, err := NewClientCSR("host1")
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(good)
	tampered := bytes.Clone(block.Bytes)
	tampered[len(tampered)-5] ^= 0xff // inside the signature
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p384DER, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "host1"}}, p384)
	enc := func(typ string, b []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}) }
	for _, c := range []struct {
		name string
		csr  []byte
		cn   string
		want string
	}{
		{"good", good, "host1", ""},
		{"other CN", good, "host2", `for CN "host1", not "host2"`},
		{"bad signature", enc("CERTIFICATE REQUEST", tampered), "host1", "signature"},
		{"P-384", enc("CERTIFICATE REQUEST", p384DER), "host1", "other than P-256"},
		{"not PEM", []byte("hello"), "host1", "not a PEM"},
		{"a certificate", enc("CERTIFICATE", block.Bytes), "host1", "not a PEM CERTIFICATE REQUEST"},
		{"trailing data", append(bytes.Clone(good), good...), "host1", "data after"},
	} {
		_, err := CheckClientCSR(c.csr, c.cn)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

func TestSignClientCSR(t *testing.T) {
	ca, err := NewCA("test CA")
	if err != nil {
		t.Fatal(err)
	}
	csr, keyPEM, err := NewClientCSR("host1")
	if err != nil {
		t.Fatal(err)
	}
	p, err := ca.SignClientCSR(csr, "host1")
	if err != nil {
		t.Fatal(err)
	}
	if p.KeyPEM != nil || p.Key != nil {
		t.Fatal("a signed CSR carries a private key")
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	if _, err := p.Cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatal(err)
	}
	if p.Cert.Subject.CommonName != "host1" {
		t.Fatalf("CN %q", p.Cert.Subject.CommonName)
	}
	// The certificate goes with the key the host made.
	if _, err := tlsPair(p.CertPEM, keyPEM); err != nil {
		t.Fatalf("certificate and the host's key: %v", err)
	}
}

func tlsPair(certPEM, keyPEM []byte) (any, error) {
	return tls.X509KeyPair(certPEM, keyPEM)
}

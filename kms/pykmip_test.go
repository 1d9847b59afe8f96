package kms_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/pki"
	"github.com/vmcryptd/vmcryptd/kms"
	"github.com/vmcryptd/vmcryptd/kms/kmstest"
)

// TestPyKMIP runs the provider against a real pykmip-server: the dialogue
// vCenter has with it, then revoke and destroy.
func TestPyKMIP(t *testing.T) {
	srv := kmstest.StartPyKMIP(t)
	ctx := testCtx(t)

	cases := []struct {
		name     string
		versions []string
		want     string
	}{
		{"negotiated", nil, "1.4"},
		{"vcenter-1.1", []string{"1.1"}, "1.1"},
		{"1.2", []string{"1.2"}, "1.2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := srv.Config("pykmip")
			cfg.KMIPVersions = tc.versions
			p := newProvider(t, cfg)

			start := time.Now()
			st := p.Status(ctx)
			t.Logf("Status took %v", time.Since(start))
			if len(st) != 1 || st[0].Error != "" || !st[0].TLSOK || st[0].KMIPVersion != tc.want {
				t.Fatalf("Status: %+v", st)
			}
			if !strings.Contains(st[0].Vendor, "PyKMIP") {
				t.Fatalf("Status vendor %q does not name PyKMIP", st[0].Vendor)
			}
			t.Logf("status: %+v", st[0])

			start = time.Now()
			id, err := p.CreateKey(ctx, "vm-"+tc.name)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("CreateKey took %v", time.Since(start))
			key, err := p.GetKey(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if len(key) != 32 || bytes.Equal(key, make([]byte, 32)) {
				t.Fatalf("key: %d bytes", len(key))
			}
			if s, err := p.KeyState(ctx, id); err != nil || s != kms.StateActive {
				t.Fatalf("KeyState = %v, %v", s, err)
			}
			ids, err := p.Locate(ctx, "vm-"+tc.name)
			if err != nil {
				t.Fatal(err)
			}
			if len(ids) != 1 || ids[0] != id {
				t.Fatalf("Locate = %v, want [%s]", ids, id)
			}
			if err := p.Revoke(ctx, id, kms.RevokeCessationOfOperation); err != nil {
				t.Fatal(err)
			}
			if s, err := p.KeyState(ctx, id); err != nil || s != kms.StateDeactivated {
				t.Fatalf("KeyState after revoke = %v, %v", s, err)
			}
			_, err = p.GetKey(ctx, id)
			if !errors.Is(err, kms.ErrKeyRevoked) {
				t.Fatalf("GetKey of revoked key: %v", err)
			}
			checkOneLine(t, err, `kms provider "pykmip"`, "server "+srv.Addr, "key is revoked")
			if err := p.Destroy(ctx, id); err != nil {
				t.Fatal(err)
			}
			// PyKMIP deletes destroyed objects outright.
			_, err = p.GetKey(ctx, id)
			if !errors.Is(err, kms.ErrNotFound) && !errors.Is(err, kms.ErrKeyDestroyed) {
				t.Fatalf("GetKey of destroyed key: %v", err)
			}
			t.Logf("after destroy: %v", err)

			// Destroy of an Active key: the provider revokes first, as
			// PyKMIP refuses to destroy Active objects.
			id2, err := p.CreateKey(ctx, "")
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Destroy(ctx, id2); err != nil {
				t.Fatal(err)
			}
		})
	}

	// Client certificates PyKMIP refuses: one whose extended key usage
	// lacks clientAuth (OpenSSL aborts the TLS 1.2 handshake with
	// "unsupported certificate") and one with no extended key usage at all
	// (TLS passes; PyKMIP answers Discover Versions with "Authentication Not
	// Successful"). Both must read as a rejected client certificate, and
	// Status must tell that the server side was fine.
	ca, err := pki.Load(srv.CAFile, srv.CAKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	refusals := []struct {
		name  string
		issue func() (*pki.Pair, error)
	}{
		{"server EKU only", func() (*pki.Pair, error) { return ca.IssueServer("vmcryptd", []string{"127.0.0.1"}) }},
		{"no EKU", func() (*pki.Pair, error) { return issueWithoutEKU(ca, "vmcryptd") }},
	}
	for i, tc := range refusals {
		t.Run(tc.name, func(t *testing.T) {
			bad, err := tc.issue()
			if err != nil {
				t.Fatal(err)
			}
			cert, key := filepath.Join(srv.Dir, fmt.Sprintf("bad%d.pem", i)), filepath.Join(srv.Dir, fmt.Sprintf("bad%d-key.pem", i))
			if err := bad.Write(cert, key); err != nil {
				t.Fatal(err)
			}
			cfg := srv.Config("pykmip")
			cfg.CertFile, cfg.KeyFile = cert, key
			p := newProvider(t, cfg)
			_, err = p.CreateKey(ctx, "x")
			if !errors.Is(err, kms.ErrClientCertRejected) {
				t.Fatalf("CreateKey: %v, want ErrClientCertRejected", err)
			}
			checkOneLine(t, err, `kms provider "pykmip": server `+srv.Addr, "tls: server rejected our client certificate")
			t.Logf("error: %v", err)
			st := p.Status(ctx)[0]
			if st.ClientCertOK || st.TLSOK || !st.ServerCertOK {
				t.Fatalf("Status: %+v", st)
			}
		})
	}
}

// issueWithoutEKU makes a client certificate with no extended key usage
// extension, which pki deliberately never produces.
func issueWithoutEKU(ca *pki.Pair, cn string) (*pki.Pair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &pki.Pair{
		Cert:    cert,
		Key:     key,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

// TestPyKMIPRSACipherSuites: issue 11 item 10. A pykmip-server whose CA
// and server certificate are RSA-2048 offers only CBC-SHA256 and RSA key
// exchange suites: with Go's defaults the handshake fails with an error
// pointing at tls_cipher_suites; with the suite listed, keys are created
// and fetched.
func TestPyKMIPRSACipherSuites(t *testing.T) {
	srv := kmstest.StartPyKMIPWith(t, kmstest.Options{RSA: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, tc := range []struct {
		name    string
		suites  []string
		wantErr string
	}{
		{"go defaults", nil, "tls_cipher_suites"},
		{"ECDHE-RSA CBC-SHA256", []string{"TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256"}, ""},
		{"RSA key exchange", []string{"TLS_RSA_WITH_AES_128_CBC_SHA256"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := srv.Config("rsa")
			cfg.TLSCipherSuites = tc.suites
			cfg.Retries = -1
			p, err := kms.New(cfg, quietLogger())
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			id, err := p.CreateKey(ctx, "rsa-"+strings.ReplaceAll(tc.name, " ", "-"))
			if tc.wantErr != "" {
				if err == nil {
					t.Fatal("CreateKey succeeded with Go's default cipher suites against an RSA PyKMIP")
				}
				checkOneLine(t, err, "server "+srv.Addr, "handshake failure", tc.wantErr)
				t.Logf("without tls_cipher_suites: %v", err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			k, err := p.GetKey(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if len(k) != kms.KEKBits/8 {
				t.Fatalf("key is %d bytes", len(k))
			}
			st := p.Status(ctx)
			if len(st) != 1 || !st[0].TLSOK || st[0].CipherSuite != tc.suites[0] {
				t.Fatalf("status: %+v, want the handshake on %s", st, tc.suites[0])
			}
		})
	}
}

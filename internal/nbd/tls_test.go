package nbd

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue makes a leaf certificate: PEM certificate and key.
func (ca *testCA) issue(t *testing.T, cn string, usage x509.ExtKeyUsage) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// qemuCreds writes a tls-creds-x509 client directory.
func qemuCreds(t *testing.T, ca []byte, cert, key []byte) string {
	t.Helper()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "ca-cert.pem"), ca, 0o600)
	if cert != nil {
		os.WriteFile(filepath.Join(dir, "client-cert.pem"), cert, 0o600)
		os.WriteFile(filepath.Join(dir, "client-key.pem"), key, 0o600)
	}
	return dir
}

// TestTLSQemuImg: over TCP on 127.0.0.1 with mutual TLS required,
// qemu-img with tls-creds-x509 and a client certificate reads the
// export; without TLS, without a client certificate, or with one from
// another CA it is refused.
func TestTLSQemuImg(t *testing.T) {
	requireTool(t, "qemu-img")
	ca := newCA(t, "nbd test CA")
	srvCert, srvKey := ca.issue(t, "127.0.0.1", x509.ExtKeyUsageServerAuth)
	kp, err := tls.X509KeyPair(srvCert, srvKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	p, want := sparseImage(t)
	s := NewServer(Config{
		Export: &Export{Name: "tls", Backend: openBackend(t, p, false)},
		TLS:    &tls.Config{Certificates: []tls.Certificate{kp}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12},
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	t.Cleanup(s.Close)
	port := l.Addr().(*net.TCPAddr).Port

	cliCert, cliKey := ca.issue(t, "qemu client", x509.ExtKeyUsageClientAuth)
	other := newCA(t, "another CA")
	// qemu checks its own certificate against its CA file, so that file
	// holds both CAs; the server trusts only its own.
	badCert, badKey := other.issue(t, "intruder", x509.ExtKeyUsageClientAuth)
	opts := func(dir string) []string {
		return []string{"--object", "tls-creds-x509,id=tls0,endpoint=client,dir=" + dir,
			"--image-opts", "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port=" + itoa(port) + ",file.export=tls,file.tls-creds=tls0"}
	}
	good := qemuCreds(t, ca.pem, cliCert, cliKey)
	out := run(t, "qemu-img", append([]string{"info", "--output=json"}, opts(good)...)...)
	if !strings.Contains(out, `"virtual-size": 8388608`) {
		t.Fatalf("qemu-img info over TLS: %s", out)
	}
	copyPath := filepath.Join(t.TempDir(), "copy.raw")
	run(t, "qemu-img", append(append([]string{"convert", "-O", "raw"}, opts(good)...), copyPath)...)
	if got, _ := os.ReadFile(copyPath); firstDiff(got, want) >= 0 {
		t.Fatal("copy over TLS differs")
	}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"plain TCP", []string{"info", "nbd://127.0.0.1:" + itoa(port) + "/tls"}},
		{"no client certificate", append([]string{"info"}, opts(qemuCreds(t, ca.pem, nil, nil))...)},
		{"client certificate of another CA", append([]string{"info"}, opts(qemuCreds(t, append(append([]byte{}, ca.pem...), other.pem...), badCert, badKey))...)},
	} {
		if msg, err := execOut("qemu-img", tc.args...); err != nil {
			t.Logf("%s: refused: %s", tc.name, strings.TrimSpace(msg))
		} else {
			t.Errorf("%s: qemu-img succeeded: %s", tc.name, msg)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for s.Conns() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.Conns(); n != 0 {
		t.Fatalf("%d connections left", n)
	}
}

func itoa(n int) string { return big.NewInt(int64(n)).String() }

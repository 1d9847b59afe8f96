// Package pki makes the small X.509 hierarchies that KMIP needs for mutual
// TLS: a CA, a server certificate and client certificates, ECDSA P-256
// unless RSA-2048 is asked for (tests of servers with RSA certificates).
//
// P-256 is chosen on purpose: PyKMIP's TLS 1.2 suite list only offers GCM
// with ECDHE-ECDSA, and Go's client refuses the CBC suites by default, so an
// ECDSA certificate is what lets Go, PyKMIP and OpenSSL all meet.
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
)

// Default validities. Lab certificates are long-lived on purpose: an expired
// lab CA would silently break every demo, and rotation is not the point of a
// lab KMS.
const (
	CAValidity   = 10 * 365 * 24 * time.Hour
	LeafValidity = 5 * 365 * 24 * time.Hour
)

// KeyType is the key algorithm of a new certificate.
type KeyType int

const (
	ECDSAP256 KeyType = iota // the default
	RSA2048
)

// Pair is a certificate with its private key, in parsed and PEM form.
type Pair struct {
	Cert *x509.Certificate
	// Key is an *ecdsa.PrivateKey or an *rsa.PrivateKey.
	Key     crypto.Signer
	CertPEM []byte
	KeyPEM  []byte
}

// TLSCertificate returns the pair as a tls.Certificate.
func (p *Pair) TLSCertificate() (tls.Certificate, error) {
	return tls.X509KeyPair(p.CertPEM, p.KeyPEM)
}

// NewCA creates a self-signed ECDSA P-256 CA.
func NewCA(commonName string) (*Pair, error) { return NewCAWith(commonName, ECDSAP256) }

// NewCAWith creates a self-signed CA with a key of type kt.
func NewCAWith(commonName string, kt KeyType) (*Pair, error) {
	tpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: commonName, Organization: []string{"vmcryptd"}},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	return issue(tpl, nil, CAValidity, kt)
}

// IssueServer issues an ECDSA P-256 TLS server certificate for the given
// host names and IP addresses (strings that parse as IPs become IP SANs).
func (ca *Pair) IssueServer(commonName string, hosts []string) (*Pair, error) {
	return ca.IssueServerWith(commonName, hosts, ECDSAP256)
}

// IssueServerWith is IssueServer with a key of type kt. RSA server
// certificates also allow key encipherment (the TLS_RSA_* suites).
func (ca *Pair) IssueServerWith(commonName string, hosts []string, kt KeyType) (*Pair, error) {
	tpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: commonName, Organization: []string{"vmcryptd"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if kt == RSA2048 {
		tpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tpl.IPAddresses = append(tpl.IPAddresses, ip)
		} else {
			tpl.DNSNames = append(tpl.DNSNames, h)
		}
	}
	return issue(tpl, ca, LeafValidity, kt)
}

// IssueClient issues a TLS client certificate. KMIP servers identify the
// client by its subject CN (PyKMIP makes it the object owner) and PyKMIP
// insists on the clientAuth extended key usage.
func (ca *Pair) IssueClient(commonName string) (*Pair, error) {
	tpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: commonName, Organization: []string{"vmcryptd"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	return issue(tpl, ca, LeafValidity, ECDSAP256)
}

func newKey(kt KeyType) (crypto.Signer, error) {
	switch kt {
	case ECDSAP256:
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("generate P-256 key: %w", err)
		}
		return k, nil
	case RSA2048:
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return nil, fmt.Errorf("generate RSA-2048 key: %w", err)
		}
		return k, nil
	}
	return nil, fmt.Errorf("unknown key type %d", kt)
}

func issue(tpl *x509.Certificate, parent *Pair, validity time.Duration, kt KeyType) (*Pair, error) {
	key, err := newKey(kt)
	if err != nil {
		return nil, err
	}
	p, err := issueFor(tpl, parent, validity, key.Public(), key)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal private key: %w", err)
	}
	p.Key = key
	p.KeyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	return p, nil
}

// issueFor certifies pub, signed by parent (self-signed by self when
// parent is nil). The Pair has no private key.
func issueFor(tpl *x509.Certificate, parent *Pair, validity time.Duration, pub crypto.PublicKey, self crypto.Signer) (*Pair, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	tpl.SerialNumber = serial
	// Back-date a little so a peer whose clock lags a few minutes does not
	// reject a certificate made a second ago.
	now := time.Now()
	tpl.NotBefore = now.Add(-1 * time.Hour)
	tpl.NotAfter = now.Add(validity)
	pubDER, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("marshal public key: %w", err)
	}
	ski := sha1.Sum(pubDER) // #nosec: subject key id, not a security function
	tpl.SubjectKeyId = ski[:]

	signer, parentCert := self, tpl
	if parent != nil {
		signer, parentCert = parent.Key, parent.Cert
		tpl.AuthorityKeyId = parent.Cert.SubjectKeyId
	}
	if signer == nil {
		return nil, errors.New("no signing key")
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, parentCert, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("create certificate %q: %w", tpl.Subject.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse new certificate: %w", err)
	}
	return &Pair{Cert: cert, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// NewClientCSR makes a P-256 key pair and a certificate signing request
// for a client certificate with subject CN commonName; the key never
// leaves the caller.
func NewClientCSR(commonName string) (csrPEM, keyPEM []byte, err error) {
	key, err := newKey(ECDSAP256)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: commonName, Organization: []string{"vmcryptd"}},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate request: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("marshal private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

// CheckClientCSR is the decision to sign a request: one PEM
// CERTIFICATE REQUEST, validly self-signed, for subject CN wantCN, with
// an ECDSA P-256 or RSA (2048 bits or more) key.
func CheckClientCSR(csrPEM []byte, wantCN string) (*x509.CertificateRequest, error) {
	block, rest := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("not a PEM CERTIFICATE REQUEST")
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, errors.New("data after the certificate request")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("certificate request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("certificate request signature: %w", err)
	}
	if csr.Subject.CommonName != wantCN {
		return nil, fmt.Errorf("certificate request is for CN %q, not %q", csr.Subject.CommonName, wantCN)
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return nil, errors.New("certificate request key: ECDSA on a curve other than P-256")
		}
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return nil, fmt.Errorf("certificate request key: RSA %d bits, at least 2048", k.N.BitLen())
		}
	default:
		return nil, fmt.Errorf("certificate request key: %T, want ECDSA P-256 or RSA", csr.PublicKey)
	}
	return csr, nil
}

// SignClientCSR issues a client certificate (as IssueClient does) for the
// key of a request CheckClientCSR accepts. The Pair has no private key.
func (ca *Pair) SignClientCSR(csrPEM []byte, wantCN string) (*Pair, error) {
	csr, err := CheckClientCSR(csrPEM, wantCN)
	if err != nil {
		return nil, err
	}
	tpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: wantCN, Organization: []string{"vmcryptd"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	return issueFor(tpl, ca, LeafValidity, csr.PublicKey, nil)
}

// Write stores the certificate (0644) and the private key (0600) atomically.
func (p *Pair) Write(certPath, keyPath string) error {
	// Key first: a certificate on disk without its key is a worse half-state
	// than a key without its certificate (Load then reports the cert missing).
	if err := atomicfile.Write(keyPath, p.KeyPEM, 0o600); err != nil {
		return err
	}
	return atomicfile.Write(certPath, p.CertPEM, 0o644)
}

// Load reads a certificate and its ECDSA or RSA private key from PEM files.
func Load(certPath, keyPath string) (*Pair, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, err
	}
	tc, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%s / %s: %w", certPath, keyPath, err)
	}
	var key crypto.Signer
	switch k := tc.PrivateKey.(type) {
	case *ecdsa.PrivateKey:
		key = k
	case *rsa.PrivateKey:
		key = k
	default:
		return nil, fmt.Errorf("%s: private key is %T, want ECDSA or RSA", keyPath, tc.PrivateKey)
	}
	cert, err := x509.ParseCertificate(tc.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certPath, err)
	}
	return &Pair{Cert: cert, Key: key, CertPEM: certPEM, KeyPEM: keyPEM}, nil
}

// CertPool reads a PEM bundle into a pool, failing if it holds no
// certificate (an empty pool would make every handshake fail with a
// confusing "unknown authority").
func CertPool(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, errors.New(path + ": no PEM certificate found")
	}
	return pool, nil
}

// Package labkms is vmcryptd's embedded lab KMS: a small KMIP 1.0-1.4
// server over mutual TLS, built on github.com/ovh/kmip-go/kmipserver, for
// demos, tests and labs without a real key manager. Standard KMIP clients
// (vmcryptd's kms package, PyKMIP, OpenSSL-based tools) can use it.
//
// Layout of its directory (Init creates what is missing):
//
//	ca.pem, ca-key.pem          ECDSA P-256 CA that signs both sides
//	server.pem, server-key.pem  server certificate (127.0.0.1, ::1, localhost)
//	client.pem, client-key.pem  client certificate (CN "vmcryptd", clientAuth)
//	master.key                  32 random bytes (0600): seals key material
//	objects.json                objects: attributes in KMIP JSON, keys sealed
//	                            with AES-256-GCM (associated data = object uid)
//
// It is a lab tool: the master key sits next to the data it protects, so
// the at-rest encryption only keeps key bytes out of backups and greps
// that do not also take master.key.
package labkms

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/pki"
	"github.com/vmcryptd/vmcryptd/kms"
)

// DefaultListenAddr is where the lab KMS listens unless told otherwise:
// loopback only, on the IANA KMIP port.
const DefaultListenAddr = "127.0.0.1:5696"

// ClientCommonName is the subject CN of the generated client certificate,
// which KMIP servers such as PyKMIP use as the object owner.
const ClientCommonName = "vmcryptd"

// MasterKeySize is the size of master.key: an AES-256 key.
const MasterKeySize = 32

// Paths names the files of a lab KMS directory, so callers can point
// clients at them (e.g. write a lab.env) without knowing the layout.
type Paths struct {
	Dir        string
	CACert     string
	CAKey      string
	ServerCert string
	ServerKey  string
	ClientCert string
	ClientKey  string
	MasterKey  string
	Store      string
}

// PathsFor returns the file paths inside dir.
func PathsFor(dir string) Paths {
	j := func(name string) string { return filepath.Join(dir, name) }
	return Paths{
		Dir:        dir,
		CACert:     j("ca.pem"),
		CAKey:      j("ca-key.pem"),
		ServerCert: j("server.pem"),
		ServerKey:  j("server-key.pem"),
		ClientCert: j("client.pem"),
		ClientKey:  j("client-key.pem"),
		MasterKey:  j("master.key"),
		Store:      j("objects.json"),
	}
}

// ProviderConfig returns a kms.Config that reaches this lab KMS at addr
// with the generated client certificate.
func (p Paths) ProviderConfig(name, addr string) kms.Config {
	return kms.Config{
		Name:     name,
		Servers:  []string{addr},
		CAFile:   p.CACert,
		CertFile: p.ClientCert,
		KeyFile:  p.ClientKey,
	}
}

// Init creates dir (0700) and generates whatever is missing: the CA, the
// server and client certificates, and the master key. Existing files are
// kept; a new CA re-issues both certificates, since the old ones would no
// longer verify. A half-present pair (certificate without key or the
// reverse) is an error rather than silently replaced.
func Init(dir string) error {
	p := PathsFor(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("lab kms init: %w", err)
	}
	ca, created, err := loadOrCreate(p.CACert, p.CAKey, nil, func() (*pki.Pair, error) {
		return pki.NewCA("vmcryptd lab KMS CA")
	})
	if err != nil {
		return fmt.Errorf("lab kms init: CA: %w", err)
	}
	if _, _, err := loadOrCreate(p.ServerCert, p.ServerKey, reissueIf(created), func() (*pki.Pair, error) {
		return ca.IssueServer("vmcryptd lab KMS", []string{"127.0.0.1", "::1", "localhost"})
	}); err != nil {
		return fmt.Errorf("lab kms init: server certificate: %w", err)
	}
	if _, _, err := loadOrCreate(p.ClientCert, p.ClientKey, reissueIf(created), func() (*pki.Pair, error) {
		return ca.IssueClient(ClientCommonName)
	}); err != nil {
		return fmt.Errorf("lab kms init: client certificate: %w", err)
	}
	if err := ensureMasterKey(p.MasterKey); err != nil {
		return fmt.Errorf("lab kms init: %w", err)
	}
	return atomicfile.SyncDir(dir)
}

func reissueIf(b bool) *bool { return &b }

// loadOrCreate loads the pair, or makes and writes it when both files are
// missing or force is set.
func loadOrCreate(certPath, keyPath string, force *bool, mk func() (*pki.Pair, error)) (*pki.Pair, bool, error) {
	certOK, keyOK := exists(certPath), exists(keyPath)
	if (force == nil || !*force) && certOK && keyOK {
		pair, err := pki.Load(certPath, keyPath)
		if err != nil {
			return nil, false, err
		}
		if time.Now().After(pair.Cert.NotAfter) {
			return nil, false, fmt.Errorf("%s expired on %s; remove it and its key to re-issue", certPath, pair.Cert.NotAfter.Format(time.DateOnly))
		}
		return pair, false, nil
	}
	if (force == nil || !*force) && certOK != keyOK {
		return nil, false, fmt.Errorf("%s and %s: only one of the pair exists; restore or remove it", certPath, keyPath)
	}
	pair, err := mk()
	if err != nil {
		return nil, false, err
	}
	if err := pair.Write(certPath, keyPath); err != nil {
		return nil, false, err
	}
	return pair, true, nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func ensureMasterKey(path string) error {
	if _, err := readMasterKey(path); !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	key := make([]byte, MasterKeySize)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("generate master key: %w", err)
	}
	defer clear(key)
	return atomicfile.Write(path, key, 0o600)
}

// readMasterKey reads master.key, refusing one that others can read: the
// store's secrecy rests entirely on it.
func readMasterKey(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("master key %s has mode %04o; it must not be accessible to group or others (chmod 600)", path, fi.Mode().Perm())
	}
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(key) != MasterKeySize {
		clear(key)
		return nil, fmt.Errorf("master key %s is %d bytes, want %d", path, len(key), MasterKeySize)
	}
	return key, nil
}

package manager

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/internal/pki"
)

// Init prepares a manager directory: its CA (kept when present), a
// server certificate for the host channel naming hosts (host names or
// IPs; 127.0.0.1 and localhost are always included), and a state dir.
// Running it again keeps the CA, so host certificates stay valid.
func Init(dir string, hosts []string) error {
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o700); err != nil {
		return fmt.Errorf("manager init: %w", err)
	}
	caCert, caKey := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	ca, err := pki.Load(caCert, caKey)
	if errors.Is(err, os.ErrNotExist) {
		if ca, err = pki.NewCA("vmcryptd manager CA"); err == nil {
			err = ca.Write(caCert, caKey)
		}
	}
	if err != nil {
		return fmt.Errorf("manager init: CA: %w", err)
	}
	srvCert, srvKey := filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile)
	if _, err := pki.Load(srvCert, srvKey); err == nil && len(hosts) == 0 {
		return nil
	}
	names := append([]string{"127.0.0.1", "localhost"}, hosts...)
	srv, err := ca.IssueServer("vmcryptd-manager", names)
	if err != nil {
		return fmt.Errorf("manager init: server certificate: %w", err)
	}
	if err := srv.Write(srvCert, srvKey); err != nil {
		return fmt.Errorf("manager init: %w", err)
	}
	return nil
}

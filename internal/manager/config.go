// Package manager is vmcryptd's manager (vCenter's role): the only holder
// of KMS credentials, the inventory of hosts and of which VM is
// registered where, and the broker that hands a KEK over mutual TLS only
// to a host that needs it (docs/MANAGER.md).
package manager

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/BurntSushi/toml"

	"github.com/vmcryptd/vmcryptd/internal/config"
	"github.com/vmcryptd/vmcryptd/kms"
)

// Config is the manager's configuration file (manager.toml).
//
//	listen           = "0.0.0.0:5697"        # host channel (mutual TLS 1.3)
//	socket           = "/run/vmcryptd/manager.sock"
//	state_dir        = "/var/lib/vmcryptd-manager"
//	audit_log        = "/var/log/vmcryptd/manager-audit.log"
//	pki_dir          = "/etc/vmcryptd/manager"  # ca.pem, ca-key.pem, server.pem, server-key.pem
//	default_provider = "kms1"
//
//	[[kms]]          # key providers, as in the daemon (kms.Config)
//	[[roles]]        # who may use the admin socket, as in the daemon
type Config struct {
	Listen          string               `toml:"listen"`
	Socket          string               `toml:"socket"`
	StateDir        string               `toml:"state_dir"`
	AuditLog        string               `toml:"audit_log"`
	PKIDir          string               `toml:"pki_dir"`
	DefaultProvider string               `toml:"default_provider"`
	KMS             []kms.Config         `toml:"kms"`
	Roles           []config.RoleBinding `toml:"roles"`
}

// Defaults.
const (
	DefaultListen = "127.0.0.1:5697"
	DefaultSocket = "/run/vmcryptd/manager.sock"
	// EnvSocket names the environment variable with the manager's admin
	// socket (the CLI's --socket for manager commands).
	EnvSocket = "VMCRYPTD_MANAGER_SOCKET"
)

// PKI file names under pki_dir.
const (
	CACertFile     = "ca.pem"
	CAKeyFile      = "ca-key.pem"
	ServerCertFile = "server.pem"
	ServerKeyFile  = "server-key.pem"
)

// LoadConfig reads and validates a manager config. Relative paths are
// taken relative to the file's directory.
func LoadConfig(path string) (*Config, error) {
	var c Config
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		return nil, fmt.Errorf("config %s: unknown key %q", path, und[0].String())
	}
	base := filepath.Dir(path)
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(base, *p)
		}
	}
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if c.StateDir == "" {
		return nil, fmt.Errorf("config %s: state_dir is required", path)
	}
	if c.PKIDir == "" {
		c.PKIDir = base
	}
	abs(&c.Socket)
	abs(&c.StateDir)
	abs(&c.PKIDir)
	if c.AuditLog == "" {
		c.AuditLog = filepath.Join(c.StateDir, "audit.log")
	}
	abs(&c.AuditLog)
	names := map[string]bool{}
	for i := range c.KMS {
		k := &c.KMS[i]
		abs(&k.CAFile)
		abs(&k.CertFile)
		abs(&k.KeyFile)
		if names[k.Name] {
			return nil, fmt.Errorf("config %s: key provider %q defined twice", path, k.Name)
		}
		names[k.Name] = true
	}
	if len(c.KMS) == 0 {
		return nil, fmt.Errorf("config %s: no [[kms]] key provider: the manager is the hosts' only key source", path)
	}
	if c.DefaultProvider == "" {
		c.DefaultProvider = c.KMS[0].Name
	}
	if !names[c.DefaultProvider] {
		return nil, fmt.Errorf("config %s: default_provider %q is not a configured [[kms]]", path, c.DefaultProvider)
	}
	for i, r := range c.Roles {
		n := 0
		if r.User != "" {
			n++
		}
		if r.UID != nil {
			n++
		}
		if r.Group != "" {
			n++
		}
		if n != 1 || r.Role == "" {
			return nil, fmt.Errorf("config %s: roles[%d] needs exactly one of user, uid, group, and a role", path, i)
		}
		if _, ok := rolePrivileges[r.Role]; !ok {
			return nil, fmt.Errorf("config %s: roles[%d]: unknown role %q", path, i, r.Role)
		}
	}
	return &c, nil
}

// WriteConfig renders c as TOML (manager init, lab up).
func WriteConfig(path string, c *Config) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("write config %s: %w", path, err)
	}
	if err := toml.NewEncoder(f).Encode(c); err != nil {
		f.Close()
		return fmt.Errorf("write config %s: %w", path, err)
	}
	return f.Close()
}

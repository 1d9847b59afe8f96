// Package config reads the daemon's TOML configuration.
package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
	"github.com/vmcryptd/vmcryptd/kms"
)

// Config is the daemon's configuration file.
//
//	socket           = "/run/vmcryptd/vmcryptd.sock"
//	state_dir        = "/var/lib/vmcryptd"
//	audit_log        = "/var/log/vmcryptd/audit.log"
//	default_provider = "lab"
//
//	[[kms]]                    # key providers, see kms.Config
//	name = "lab"
//	...
//
//	[manager]                  # or: the manager is the key source (no [[kms]])
//	address = "mgr:5697"       # see mgrproto.Config
//	...
//
//	[[datastores]]
//	name = "ds1"
//	path = "/srv/datastore1"
//
//	[[roles]]                  # who may do what (root is always Administrator)
//	user = "alice"             # or group = "vmadmins", or uid = 1001
//	role = "NoCryptoAdmin"
type Config struct {
	Socket string `toml:"socket"`
	// SocketGroup (name or numeric gid) owns the socket and its directory,
	// so members can reach the daemon; their role decides what they may do.
	SocketGroup     string       `toml:"socket_group"`
	StateDir        string       `toml:"state_dir"`
	AuditLog        string       `toml:"audit_log"`
	DefaultProvider string       `toml:"default_provider"`
	KMS             []kms.Config `toml:"kms"`
	// Manager makes the manager this host's only key source: the host
	// holds no KMS address or credential, and KEKs come over the host
	// channel for the VMs registered to it. Exclusive with [[kms]].
	Manager    *mgrproto.Config `toml:"manager,omitempty"`
	Datastores []Datastore      `toml:"datastores"`
	Roles      []RoleBinding    `toml:"roles"`
	Mounts     []Mount          `toml:"mounts"`
	// CoreDumpPatterns adds file-name patterns (path.Match syntax) of core
	// dumps in VM directories, which are encrypted with the host key; the
	// built-in ones are *.zdump, vmware-vmx-*.core, core and core.<digits>.
	CoreDumpPatterns []string `toml:"core_dump_patterns"`
	// KeyRetryInterval is how often KEKs that could not be fetched are
	// tried again, e.g. "10s" (default 10s).
	KeyRetryInterval time.Duration `toml:"key_retry_interval"`
	// MetricsListen serves Prometheus metrics over HTTP on this address
	// (e.g. "127.0.0.1:9469"); empty disables it.
	MetricsListen string `toml:"metrics_listen"`
	// MountRoots are the directories under which callers other than root
	// may mount views (the daemon, as root, creates the mountpoint). With
	// none, only root may mount through the API; configured [[mounts]]
	// are the administrator's and always allowed.
	MountRoots []string `toml:"mount_roots"`
}

// Datastore is a directory of VM directories.
type Datastore struct {
	Name string `toml:"name"`
	Path string `toml:"path"`
}

// Mount is a decrypted view the daemon keeps mounted.
type Mount struct {
	Datastore  string `toml:"datastore"` // name or path
	Mountpoint string `toml:"mountpoint"`
	ReadOnly   bool   `toml:"read_only"`
	AllowOther bool   `toml:"allow_other"`
}

// RoleBinding gives a role to a unix user or group.
type RoleBinding struct {
	User  string `toml:"user"`
	UID   *int   `toml:"uid"`
	Group string `toml:"group"`
	Role  string `toml:"role"`
}

// Defaults for a system-wide daemon.
const (
	DefaultSocket   = "/run/vmcryptd/vmcryptd.sock"
	DefaultStateDir = "/var/lib/vmcryptd"
)

// Load reads and validates a config file. Relative paths in it are taken
// relative to the file's directory.
func Load(path string) (*Config, error) {
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
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.AuditLog == "" {
		c.AuditLog = filepath.Join(c.StateDir, "audit.log")
	}
	abs(&c.Socket)
	abs(&c.StateDir)
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
		if err := kms.CheckCipherSuites(k.TLSCipherSuites); err != nil {
			return nil, fmt.Errorf("config %s: key provider %q: %w", path, k.Name, err)
		}
		names[k.Name] = true
	}
	if m := c.Manager; m != nil {
		if len(c.KMS) > 0 {
			return nil, fmt.Errorf("config %s: [manager] and [[kms]] are exclusive: a host either talks to key servers itself (trusted host) or gets its keys from the manager", path)
		}
		if err := m.Check(); err != nil {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
		abs(&m.CAFile)
		abs(&m.CertFile)
		abs(&m.KeyFile)
	}
	if c.DefaultProvider == "" && len(c.KMS) == 1 {
		c.DefaultProvider = c.KMS[0].Name
	}
	// With [manager], default_provider names one of the manager's
	// providers, which only the manager knows.
	if c.DefaultProvider != "" && c.Manager == nil && !names[c.DefaultProvider] {
		return nil, fmt.Errorf("config %s: default_provider %q is not a configured [[kms]]", path, c.DefaultProvider)
	}
	for i := range c.Datastores {
		abs(&c.Datastores[i].Path)
		if c.Datastores[i].Name == "" || c.Datastores[i].Path == "" {
			return nil, fmt.Errorf("config %s: datastore %d needs name and path", path, i)
		}
	}
	for i := range c.MountRoots {
		abs(&c.MountRoots[i])
	}
	for _, p := range c.CoreDumpPatterns {
		if _, err := filepath.Match(p, ""); err != nil {
			return nil, fmt.Errorf("config %s: core_dump_patterns: %q: %w", path, p, err)
		}
	}
	for i := range c.Mounts {
		abs(&c.Mounts[i].Mountpoint)
		if filepath.IsAbs(c.Mounts[i].Datastore) || strings.ContainsRune(c.Mounts[i].Datastore, '/') {
			abs(&c.Mounts[i].Datastore)
		}
		if c.Mounts[i].Datastore == "" || c.Mounts[i].Mountpoint == "" {
			return nil, fmt.Errorf("config %s: mount %d needs datastore and mountpoint", path, i)
		}
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
	}
	return &c, nil
}

// Write renders c as TOML (used by `vmcryptd lab up`).
func Write(path string, c *Config) error {
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

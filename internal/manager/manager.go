package manager

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
	"github.com/vmcryptd/vmcryptd/internal/pki"
	"github.com/vmcryptd/vmcryptd/kms"
)

const (
	fetchTimeout     = 30 * time.Second
	handshakeTimeout = 10 * time.Second
	idleTimeout      = 60 * time.Second
	requestTimeout   = 45 * time.Second
	// maxConns bounds concurrent host-channel connections.
	maxConns = 64
)

// Options configure a Manager.
type Options struct {
	Config  *Config
	Logger  *slog.Logger
	Version string
	// AddrFile, when set, receives the host channel's listen address once
	// it is bound (the lab uses it with port 0).
	AddrFile string
}

// Manager is one running manager.
type Manager struct {
	cfg     *Config
	log     *slog.Logger
	version string
	addr    string
	started time.Time
	ca      *pki.Pair
	tlsCfg  *tls.Config
	audit   *auditLog
	keys    *keyCache
	invPath string

	providers map[string]*kms.Provider

	mu     sync.Mutex
	inv    *inventory
	seen   map[string]hostSeen // runtime: last hello per host
	listen string              // bound host-channel address
	conns  map[net.Conn]string // open host-channel connections, by host name
	// lockWake is closed (and replaced) when a host's lock changes or the
	// host is removed: it wakes that host's watch requests.
	lockWake map[string]chan struct{}
	lookupU  func(int) (string, []string)
}

// hostSeen is what a host said in its last hello.
type hostSeen struct {
	At     time.Time
	Status mgrproto.HostStatus
	Remote string
}

// New loads the PKI, the inventory and the providers. It does not listen
// or contact the KMS yet.
func New(opts Options) (*Manager, error) {
	cfg := opts.Config
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(cfg.AuditLog), 0o700); err != nil {
		return nil, fmt.Errorf("audit log dir: %w", err)
	}
	ca, err := pki.Load(filepath.Join(cfg.PKIDir, CACertFile), filepath.Join(cfg.PKIDir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("manager CA in %s (run 'vmcryptd manager init'): %w", cfg.PKIDir, err)
	}
	srv, err := tls.LoadX509KeyPair(filepath.Join(cfg.PKIDir, ServerCertFile), filepath.Join(cfg.PKIDir, ServerKeyFile))
	if err != nil {
		return nil, fmt.Errorf("manager server certificate in %s: %w", cfg.PKIDir, err)
	}
	invPath := filepath.Join(cfg.StateDir, "inventory.json")
	inv, err := loadInventory(invPath)
	if err != nil {
		return nil, err
	}
	audit, err := openAudit(cfg.AuditLog)
	if err != nil {
		return nil, err
	}
	m := &Manager{
		cfg: cfg, log: opts.Logger, version: opts.Version, addr: opts.AddrFile, started: time.Now(),
		ca: ca, audit: audit, keys: newKeyCache(), invPath: invPath, inv: inv,
		providers: map[string]*kms.Provider{}, seen: map[string]hostSeen{}, conns: map[net.Conn]string{},
		lockWake: map[string]chan struct{}{}, lookupU: lookupUser,
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	m.tlsCfg = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{srv},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		NextProtos:   []string{mgrproto.ALPN},
	}
	for _, kc := range cfg.KMS {
		p, err := kms.New(kc, m.log.With("provider", kc.Name))
		if err != nil {
			m.Close()
			return nil, err
		}
		m.providers[kc.Name] = p
	}
	return m, nil
}

// Run serves the host channel and the admin socket until ctx is done.
func (m *Manager) Run(ctx context.Context) error {
	hostLn, err := net.Listen("tcp", m.cfg.Listen)
	if err != nil {
		return fmt.Errorf("host channel %s: %w", m.cfg.Listen, err)
	}
	defer hostLn.Close()
	m.mu.Lock()
	m.listen = hostLn.Addr().String()
	m.mu.Unlock()
	adminLn, err := listenUnix(m.cfg.Socket)
	if err != nil {
		return err
	}
	defer os.Remove(m.cfg.Socket)
	srv := &http.Server{
		Handler:           m.adminRoutes(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       5 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ConnContext:       peerContext,
		ErrorLog:          slog.NewLogLogger(m.log.Handler(), slog.LevelWarn),
	}
	if m.addr != "" {
		if err := os.WriteFile(m.addr, []byte(m.listen+"\n"), 0o600); err != nil {
			return fmt.Errorf("addr file: %w", err)
		}
	}
	m.log.Info("vmcryptd manager serving", "listen", m.listen, "socket", m.cfg.Socket, "pid", os.Getpid())
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(adminLn) }()
	go func() { errc <- m.serveHosts(ctx, hostLn) }()
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	hostLn.Close()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	m.mu.Lock()
	for c := range m.conns {
		c.Close()
	}
	m.mu.Unlock()
	m.log.Info("vmcryptd manager stopped; keys zeroed")
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// Close zeroes every cached key and releases resources.
func (m *Manager) Close() {
	m.keys.close()
	for _, p := range m.providers {
		p.Close()
	}
	if m.audit != nil {
		m.audit.close()
	}
}

// update applies fn to a copy of the inventory, saves it, and only then
// makes it current: a failed save changes nothing. m.mu is held.
func (m *Manager) updateLocked(fn func(inv *inventory) error) error {
	next := m.inv.clone()
	if err := fn(next); err != nil {
		return err
	}
	if err := next.save(m.invPath); err != nil {
		return err
	}
	m.inv = next
	return nil
}

// lockWakeLocked is the channel closed at the next lock change of host.
// m.mu is held.
func (m *Manager) lockWakeLocked(host string) chan struct{} {
	ch, ok := m.lockWake[host]
	if !ok {
		ch = make(chan struct{})
		m.lockWake[host] = ch
	}
	return ch
}

// wakeLocked wakes every watch of host. m.mu is held.
func (m *Manager) wakeLocked(host string) {
	if ch, ok := m.lockWake[host]; ok {
		close(ch)
		delete(m.lockWake, host)
	}
}

func (m *Manager) providerNames() []string {
	out := make([]string, 0, len(m.providers))
	for n := range m.providers {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("socket %s: another manager is already serving it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("socket %s: remove stale: %w", path, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return ln, nil
}

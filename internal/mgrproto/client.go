package mgrproto

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Config is a host daemon's [manager] section: where the manager listens
// and the host's credentials for it (a bundle from `vmcryptd manager host
// add`). With it the host holds no KMS address or credential.
//
//	[manager]
//	address   = "mgr.example:5697"
//	ca_file   = "/etc/vmcryptd/manager/ca.pem"
//	cert_file = "/etc/vmcryptd/manager/host.pem"
//	key_file  = "/etc/vmcryptd/manager/host-key.pem"
type Config struct {
	Address  string `toml:"address"`
	CAFile   string `toml:"ca_file"`
	CertFile string `toml:"cert_file"`
	KeyFile  string `toml:"key_file"`
	// ServerName overrides the name checked against the manager's
	// certificate (default: the host part of address).
	ServerName string `toml:"server_name,omitempty"`
}

// Check reports what a [manager] section lacks.
func (c Config) Check() error {
	if c.Address == "" || c.CAFile == "" || c.CertFile == "" || c.KeyFile == "" {
		return errors.New("[manager] needs address, ca_file, cert_file and key_file")
	}
	if _, _, err := net.SplitHostPort(c.Address); err != nil {
		return fmt.Errorf("[manager] address %q: %w", c.Address, err)
	}
	return nil
}

// DefaultTimeout bounds one request: connect, handshake, request, reply.
const DefaultTimeout = 15 * time.Second

// Client is a host's side of the channel. Each request runs on a fresh
// connection, so a manager restart or a revoked certificate takes effect
// on the next request. Safe for concurrent use.
type Client struct {
	addr    string
	tls     *tls.Config
	Timeout time.Duration

	mu   sync.Mutex
	last Reply // the last hello's answer
}

// NewClient loads the host's credentials now, so a wrong path fails at
// start-up.
func NewClient(c Config) (*Client, error) {
	if err := c.Check(); err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("[manager] ca_file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("[manager] ca_file %s: no PEM certificate found", c.CAFile)
	}
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("[manager] host certificate: %w", err)
	}
	name := c.ServerName
	if name == "" {
		name, _, _ = net.SplitHostPort(c.Address)
	}
	return &Client{addr: c.Address, Timeout: DefaultTimeout, tls: &tls.Config{
		MinVersion:   tls.VersionTLS13,
		RootCAs:      pool,
		Certificates: []tls.Certificate{cert},
		ServerName:   name,
		NextProtos:   []string{ALPN},
	}}, nil
}

// Address is the manager's address.
func (c *Client) Address() string { return c.addr }

// UnreachableError is a request that never got an answer: the manager is
// down, the network is, or the TLS handshake failed.
type UnreachableError struct {
	Addr string
	Err  error
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("manager unreachable at %s: %v", e.Addr, e.Err)
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// RefusedError is a request the manager answered with a refusal.
type RefusedError struct {
	Code string
	Msg  string
}

func (e *RefusedError) Error() string { return "manager refused: " + e.Msg }

// do sends q and reads the reply; when the reply announces a key, the
// key's bytes are read into a fresh slice the caller owns.
func (c *Client) do(ctx context.Context, q *Request) (Reply, []byte, error) {
	return c.doTimeout(ctx, q, c.Timeout)
}

func (c *Client) doTimeout(ctx context.Context, q *Request, timeout time.Duration) (Reply, []byte, error) {
	if err := q.Check(); err != nil {
		return Reply{}, nil, fmt.Errorf("manager request: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	d := tls.Dialer{Config: c.tls}
	conn, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return Reply{}, nil, &UnreachableError{c.addr, err}
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if err := WriteFrame(conn, q); err != nil {
		return Reply{}, nil, &UnreachableError{c.addr, err}
	}
	var r Reply
	if err := ReadFrame(conn, &r); err != nil {
		// TLS 1.3 client certificates are checked after the client's
		// handshake returns: a refused certificate shows up here.
		return Reply{}, nil, &UnreachableError{c.addr, err}
	}
	if !r.OK {
		msg := r.Error
		if msg == "" {
			msg = "no reason given"
		}
		return r, nil, &RefusedError{Code: r.Code, Msg: msg}
	}
	if r.KeyLen == 0 {
		return r, nil, nil
	}
	if r.KeyLen != KeyLen {
		return r, nil, fmt.Errorf("manager reply announces a %d-byte key, want %d", r.KeyLen, KeyLen)
	}
	key := make([]byte, KeyLen)
	if _, err := io.ReadFull(conn, key); err != nil {
		clear(key)
		return r, nil, &UnreachableError{c.addr, fmt.Errorf("key cut short: %w", err)}
	}
	return r, key, nil
}

// Hello reports the host's status (a heartbeat) and learns the manager's
// providers and default provider.
func (c *Client) Hello(ctx context.Context, st HostStatus) (Reply, error) {
	r, _, err := c.do(ctx, &Request{Op: OpHello, Status: &st})
	if err == nil {
		c.mu.Lock()
		c.last = r
		c.mu.Unlock()
	}
	return r, err
}

// Watch waits until the manager's lock of this host differs from locked
// (the host's own belief), or WatchHold passes, and returns the manager's
// answer: Locked and LockReason say what the host must be.
func (c *Client) Watch(ctx context.Context, locked bool) (Reply, error) {
	r, _, err := c.doTimeout(ctx, &Request{Op: OpWatch, Locked: locked}, WatchHold+c.Timeout)
	return r, err
}

// LastHello is the answer to the last successful Hello (zero before one).
func (c *Client) LastHello() Reply {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.last
}

// CreateKey asks the manager for a new KEK on provider (empty: the
// manager's default) and returns its reference.
func (c *Client) CreateKey(ctx context.Context, provider, name string) (KeyRef, error) {
	r, _, err := c.do(ctx, &Request{Op: OpCreateKey, Provider: provider, Name: name})
	if err != nil {
		return KeyRef{}, err
	}
	if r.Provider == "" || r.KeyID == "" || (provider != "" && r.Provider != provider) {
		return KeyRef{}, fmt.Errorf("manager answered create_key on %q with key %s/%s", provider, r.Provider, r.KeyID)
	}
	return KeyRef{r.Provider, r.KeyID}, nil
}

// GetKey fetches a KEK and its KMIP state; the caller owns (and clears)
// the key.
func (c *Client) GetKey(ctx context.Context, ref KeyRef, vmID string) ([]byte, string, error) {
	r, key, err := c.do(ctx, &Request{Op: OpGetKey, Provider: ref.Provider, KeyID: ref.KeyID, VMID: vmID})
	if err != nil {
		return nil, "", err
	}
	if key == nil {
		return nil, "", errors.New("manager answered get_key without a key")
	}
	return key, r.State, nil
}

// RegisterVM records vm as registered to this host.
func (c *Client) RegisterVM(ctx context.Context, vm VM) error {
	_, _, err := c.do(ctx, &Request{Op: OpRegisterVM, VM: &vm})
	return err
}

// UnregisterVM removes the VM from this host's inventory.
func (c *Client) UnregisterVM(ctx context.Context, vmID string) error {
	_, _, err := c.do(ctx, &Request{Op: OpUnregisterVM, VMID: vmID})
	return err
}

// ListPolicies returns the manager's storage policies, built-ins first.
func (c *Client) ListPolicies(ctx context.Context) ([]Policy, error) {
	r, _, err := c.do(ctx, &Request{Op: OpListPolicies})
	if err != nil {
		return nil, err
	}
	if len(r.Policies) > MaxPolicies {
		return nil, fmt.Errorf("manager answered list_policies with %d policies, at most %d", len(r.Policies), MaxPolicies)
	}
	return r.Policies, nil
}

// GetPolicy resolves a storage policy by name: whether it encrypts and
// under which provider. An unknown name is a *RefusedError with code
// CodeNotFound.
func (c *Client) GetPolicy(ctx context.Context, name string) (Policy, error) {
	r, _, err := c.do(ctx, &Request{Op: OpGetPolicy, Policy: name})
	if err != nil {
		return Policy{}, err
	}
	if r.Policy == nil || r.Policy.Name != name || (r.Policy.Encrypts && r.Policy.Provider == "") {
		return Policy{}, fmt.Errorf("manager answered get_policy %q with %+v", name, r.Policy)
	}
	return *r.Policy, nil
}

// KeyServer is the keys.KeyServer (and keys.KeyStateServer) of one
// provider name, served through the manager.
type KeyServer struct {
	C        *Client
	Provider string
}

func (k KeyServer) CreateKey(ctx context.Context, name string) (string, error) {
	ref, err := k.C.CreateKey(ctx, k.Provider, name)
	if err != nil {
		return "", err
	}
	return ref.KeyID, nil
}

func (k KeyServer) GetKey(ctx context.Context, id string) ([]byte, error) {
	raw, _, err := k.C.GetKey(ctx, KeyRef{k.Provider, id}, "")
	return raw, err
}

func (k KeyServer) FetchKEK(ctx context.Context, id string) ([]byte, string, error) {
	return k.C.GetKey(ctx, KeyRef{k.Provider, id}, "")
}

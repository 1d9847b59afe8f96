// Package kms is vmcryptd's client side of the Key Management
// Interoperability Protocol (KMIP 1.0-1.4 over mutual TLS).
//
// A Provider is what vCenter calls a key provider: a name plus one or more
// KMIP servers that hold the same keys. The engine consumes it through the
// keys.KeyServer interface to create and fetch key-encryption keys
// (AES-256; the daemon checks at compile time that Provider satisfies it);
// the daemon and CLI use the rest (Locate, KeyState, Revoke, Destroy,
// Status).
//
// The dialogue mirrors what vCenter sends, so that any KMS certified for
// vSphere works: Discover Versions with a KMIP 1.1 header on every new
// connection (then the negotiated version, 1.0 to 1.4), Query (Server
// Information) for Status, and Create, Activate, Get, Get Attributes
// (State) and Add Attribute for the x-* tags.
package kms

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/kmipclient"

	"github.com/vmcryptd/vmcryptd/internal/pki"
)

// Provider talks to the KMIP servers of one key provider, with failover,
// per-request timeouts, retries and a per-server connection pool. It is
// safe for concurrent use. Close it to drop pooled connections.
type Provider struct {
	cfg      Config
	log      *slog.Logger
	tlsCfg   *tls.Config
	versions []kmip.ProtocolVersion
	servers  []*server
	closed   atomic.Bool
}

// New builds a Provider from its configuration. It loads the CA bundle and
// the client certificate now, so a wrong path fails at startup rather than
// on the first key request; it does not contact any server (see Status).
// A nil logger means slog.Default().
func New(cfg Config, logger *slog.Logger) (*Provider, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.Default()
	}
	fail := func(err error) (*Provider, error) {
		return nil, fmt.Errorf("kms provider %q: %w", cfg.Name, err)
	}
	pool, err := pki.CertPool(cfg.CAFile)
	if err != nil {
		return fail(fmt.Errorf("ca_file: %w", err))
	}
	cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return fail(fmt.Errorf("client certificate: %w", err))
	}
	tlsCfg := &tls.Config{
		// KMIP 1.2+ profiles require TLS 1.2 at least; Go refuses 1.0 anyway.
		MinVersion:   tls.VersionTLS12,
		RootCAs:      pool,
		Certificates: []tls.Certificate{cert},
		ServerName:   cfg.ServerName,
	}
	if len(cfg.TLSCipherSuites) > 0 {
		ids, err := cipherSuiteIDs(cfg.TLSCipherSuites)
		if err != nil {
			return fail(err)
		}
		// Go's defaults plus the requested ones: setting CipherSuites
		// replaces the default list, so start from it. Go's default list
		// is its secure list without RSA key exchange (Go 1.22+): keep
		// those out unless listed too.
		for _, s := range tls.CipherSuites() {
			if !strings.HasPrefix(s.Name, "TLS_RSA_") {
				tlsCfg.CipherSuites = append(tlsCfg.CipherSuites, s.ID)
			}
		}
		for _, id := range ids {
			if !slices.Contains(tlsCfg.CipherSuites, id) {
				tlsCfg.CipherSuites = append(tlsCfg.CipherSuites, id)
			}
		}
		if bad := insecureSuites(cfg.TLSCipherSuites); len(bad) > 0 {
			logger.Warn("kms provider allows TLS cipher suites Go deems insecure, because tls_cipher_suites lists them", "kms_provider", cfg.Name, "suites", strings.Join(bad, ","))
		}
	}
	versions, _ := parseVersions(cfg.KMIPVersions) // validated in withDefaults
	p := &Provider{
		cfg:      cfg,
		log:      logger.With("kms_provider", cfg.Name),
		tlsCfg:   tlsCfg,
		versions: versions,
	}
	for _, addr := range cfg.Servers {
		p.servers = append(p.servers, &server{
			addr: addr,
			p:    p,
			sem:  make(chan struct{}, cfg.PoolSize),
		})
	}
	return p, nil
}

// CheckCipherSuites validates tls_cipher_suites names: each must be a
// TLS suite Go implements, by its tls.CipherSuiteName.
func CheckCipherSuites(names []string) error {
	_, err := cipherSuiteIDs(names)
	return err
}

// insecureSuites lists the names among names that Go deems insecure.
func insecureSuites(names []string) []string {
	var out []string
	for _, s := range tls.InsecureCipherSuites() {
		if slices.Contains(names, s.Name) {
			out = append(out, s.Name)
		}
	}
	return out
}

func cipherSuiteIDs(names []string) ([]uint16, error) {
	known := map[string]uint16{}
	for _, s := range tls.CipherSuites() {
		known[s.Name] = s.ID
	}
	for _, s := range tls.InsecureCipherSuites() {
		known[s.Name] = s.ID
	}
	var ids []uint16
	for _, n := range names {
		id, ok := known[n]
		if !ok {
			return nil, fmt.Errorf("tls_cipher_suites: unknown suite %q", n)
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// Name is the provider name from the configuration.
func (p *Provider) Name() string { return p.cfg.Name }

// Servers returns the normalised server addresses in failover order.
func (p *Provider) Servers() []string { return append([]string(nil), p.cfg.Servers...) }

// Close drops all pooled connections. Operations after Close fail with
// ErrClosed; operations in flight finish and then close their connection.
func (p *Provider) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	for _, s := range p.servers {
		s.closeIdle()
	}
	return nil
}

// server is one KMIP endpoint with its connection pool.
type server struct {
	addr string
	p    *Provider
	// sem bounds the connections open at once (idle + in use).
	sem chan struct{}

	// noAddAttribute is set once the server refused Add Attribute as an
	// unknown operation.
	noAddAttribute atomic.Bool

	mu        sync.Mutex
	idle      []*conn
	downUntil time.Time
}

// conn is one pooled KMIP connection.
type conn struct {
	client   *kmipclient.Client
	lastUsed time.Time
}

// handshakeInfo is filled by the dialer for Status.
type handshakeInfo struct {
	tcpOK          bool
	serverVerified bool
	tlsOK          bool
	tlsVers        uint16
	suite          uint16
}

// tlsDialer returns a dialer doing TCP connect and TLS handshake under
// ConnectTimeout.
func (s *server) tlsDialer(info *handshakeInfo) func(ctx context.Context) (net.Conn, error) {
	cfg := s.p.tlsCfg.Clone()
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(s.addr)
		if err != nil {
			host = s.addr
		}
		cfg.ServerName = host
	}
	if info != nil {
		// Called once our side has verified the server chain: tells a
		// server-certificate problem from a later refusal of ours (with
		// TLS 1.2 the latter also aborts the handshake).
		cfg.VerifyConnection = func(tls.ConnectionState) error {
			info.serverVerified = true
			return nil
		}
	}
	timeout := s.p.cfg.ConnectTimeout
	return func(ctx context.Context) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		var d net.Dialer
		raw, err := d.DialContext(ctx, "tcp", s.addr)
		if err != nil {
			return nil, err
		}
		if info != nil {
			info.tcpOK = true
		}
		tc := tls.Client(raw, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			_ = raw.Close()
			return nil, err
		}
		if info != nil {
			st := tc.ConnectionState()
			info.tlsOK, info.tlsVers, info.suite = true, st.Version, st.CipherSuite
		}
		return tc, nil
	}
}

// dial opens a KMIP connection: TLS, then Discover Versions (kmipclient
// sends it with a KMIP 1.1 header, as vCenter does, and falls back to 1.0
// when the server does not know the operation). The wire transport is our
// own (see syncTransport).
func (s *server) dial(ctx context.Context, info *handshakeInfo) (*conn, error) {
	dial := s.tlsDialer(info)
	opts := []kmipclient.Option{
		kmipclient.WithTransportBuilder(func(ctx context.Context, di kmipclient.DialInfo) (kmipclient.Transport, error) {
			return newSyncTransport(ctx, dial, di.MaxMessageSize)
		}),
	}
	switch {
	case len(s.p.versions) == 1 && s.p.versions[0] == kmip.V1_0:
		// KMIP 1.0 has no Discover Versions; a 1.0-only server may reject
		// the 1.1 header it is sent with, so do not negotiate at all.
		opts = append(opts, kmipclient.EnforceVersion(kmip.V1_0))
	case len(s.p.versions) > 0:
		opts = append(opts, kmipclient.WithKmipVersions(s.p.versions...))
	}
	ctx, cancel := context.WithTimeout(ctx, s.p.cfg.ConnectTimeout)
	defer cancel()
	client, err := kmipclient.DialContext(ctx, s.addr, opts...)
	if err != nil {
		return nil, &transportError{classifyTransport(err)}
	}
	return &conn{client: client, lastUsed: time.Now()}, nil
}

// acquire returns a pooled or new connection; release must follow.
func (s *server) acquire(ctx context.Context) (*conn, error) {
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, &transportError{cause(ErrTimeout, "waiting for a pooled connection", ctx.Err())}
	}
	now := time.Now()
	s.mu.Lock()
	for len(s.idle) > 0 {
		c := s.idle[len(s.idle)-1]
		s.idle = s.idle[:len(s.idle)-1]
		if now.Sub(c.lastUsed) > s.p.cfg.IdleTimeout {
			// Closed below, outside the lock: Close may block on I/O.
			s.mu.Unlock()
			_ = c.client.Close()
			s.mu.Lock()
			continue
		}
		s.mu.Unlock()
		return c, nil
	}
	s.mu.Unlock()
	c, err := s.dial(ctx, nil)
	if err != nil {
		<-s.sem
		return nil, err
	}
	return c, nil
}

// release returns c to the pool, or closes it when it is broken or the
// provider is closed.
func (s *server) release(c *conn, broken bool) {
	defer func() { <-s.sem }()
	if broken || s.p.closed.Load() {
		_ = c.client.Close()
		return
	}
	c.lastUsed = time.Now()
	s.mu.Lock()
	s.idle = append(s.idle, c)
	s.mu.Unlock()
}

func (s *server) closeIdle() {
	s.mu.Lock()
	idle := s.idle
	s.idle = nil
	s.mu.Unlock()
	for _, c := range idle {
		_ = c.client.Close()
	}
}

func (s *server) isDown(now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return now.Before(s.downUntil)
}

// downPeriod is how long a failed server stays at the back of the line.
// Being "down" only reorders: the server is still tried when the ones
// ahead of it fail, and a success there clears the mark at once.
const downPeriod = 30 * time.Second

// markDown moves the server to the back of the failover order for a while,
// so that a dead first server does not cost a connect timeout on every
// request.
func (s *server) markDown() {
	s.mu.Lock()
	s.downUntil = time.Now().Add(downPeriod)
	s.mu.Unlock()
	// Pooled connections to a failing server are suspect as well.
	s.closeIdle()
}

func (s *server) markUp() {
	s.mu.Lock()
	s.downUntil = time.Time{}
	s.mu.Unlock()
}

// order returns the servers to try: healthy ones in configured order, then
// the ones recently marked down.
func (p *Provider) order() []*server {
	now := time.Now()
	up := make([]*server, 0, len(p.servers))
	var down []*server
	for _, s := range p.servers {
		if s.isDown(now) {
			down = append(down, s)
		} else {
			up = append(up, s)
		}
	}
	return append(up, down...)
}

// transportError marks a connection-level failure: the operation may be
// retried on another server.
type transportError struct{ err error }

func (e *transportError) Error() string { return e.err.Error() }
func (e *transportError) Unwrap() error { return e.err }

// session is one server connection lent to an operation. All requests of
// one operation (Create, Activate, Add Attribute...) go over it, so that a
// multi-step operation never straddles two servers.
type session struct {
	srv    *server
	c      *conn
	broken bool
}

// call sends one request and returns the response payload. Failures are a
// *kmipError when the server answered, a *transportError otherwise.
func (s *session) call(ctx context.Context, req kmip.OperationPayload) (kmip.OperationPayload, error) {
	ctx, cancel := context.WithTimeout(ctx, s.srv.p.cfg.Timeout)
	defer cancel()
	res, err := s.c.client.Batch(ctx, req)
	if err != nil {
		s.broken = true
		return nil, &transportError{classifyTransport(err)}
	}
	bi := res[0]
	if bi.ResultStatus != kmip.ResultStatusSuccess {
		return nil, &kmipError{Operation: req.Operation(), Reason: bi.ResultReason, Message: bi.ResultMessage}
	}
	if bi.ResponsePayload == nil {
		return nil, &kmipError{Operation: req.Operation(), Reason: kmip.ResultReasonGeneralFailure, Message: "response has no payload"}
	}
	return bi.ResponsePayload, nil
}

// run executes fn against the servers in failover order, with retry
// rounds and backoff for connection-level failures. A server's answer
// (success or KMIP error) ends the operation: the servers of one provider
// share their keys, so asking the next one would only repeat it.
func (p *Provider) run(ctx context.Context, op string, fn func(ctx context.Context, s *session) error) error {
	if p.closed.Load() {
		return &Error{Provider: p.cfg.Name, Op: op, Err: ErrClosed}
	}
	last := map[*server]error{}
	var tried []*server
	backoff := p.cfg.RetryBackoff
	for round := 0; round <= p.cfg.Retries; round++ {
		if round > 0 {
			if !retryable(last) {
				break
			}
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return p.fail(op, tried, last, ctx.Err())
			case <-t.C:
			}
			backoff = min(2*backoff, maxRetryBackoff)
		}
		for _, srv := range p.order() {
			if ctx.Err() != nil {
				return p.fail(op, tried, last, ctx.Err())
			}
			err := srv.do(ctx, fn)
			if err == nil {
				srv.markUp()
				return nil
			}
			var te *transportError
			var ke *kmipError
			switch {
			case errors.As(err, &te):
				err = te.err
			case errors.As(err, &ke) && ke.Reason == kmip.ResultReasonAuthenticationNotSuccessful:
				// Answered, but refused us; another server may not.
			default:
				return &Error{Provider: p.cfg.Name, Op: op, Servers: []ServerError{{Addr: srv.addr, Err: err}}}
			}
			if _, seen := last[srv]; !seen {
				tried = append(tried, srv)
			}
			last[srv] = err
			srv.markDown()
			p.log.Warn("kms server failed", "server", srv.addr, "op", op, "round", round, "err", oneLine(err))
		}
	}
	return p.fail(op, tried, last, nil)
}

func (p *Provider) fail(op string, tried []*server, last map[*server]error, ctxErr error) error {
	e := &Error{Provider: p.cfg.Name, Op: op}
	for _, s := range tried {
		e.Servers = append(e.Servers, ServerError{Addr: s.addr, Err: last[s]})
	}
	if len(e.Servers) == 0 {
		e.Err = ctxErr
		if e.Err == nil {
			e.Err = errors.New("no server tried")
		}
	}
	return e
}

// retryable: another round makes sense only if some failure could be
// transient. A certificate the server rejects stays rejected.
func retryable(last map[*server]error) bool {
	for _, err := range last {
		if !errors.Is(err, ErrServerCert) && !errors.Is(err, ErrClientCertRejected) {
			return true
		}
	}
	return false
}

func (s *server) do(ctx context.Context, fn func(ctx context.Context, s *session) error) error {
	c, err := s.acquire(ctx)
	if err != nil {
		return err
	}
	sess := &session{srv: s, c: c}
	err = fn(ctx, sess)
	s.release(c, sess.broken)
	return err
}

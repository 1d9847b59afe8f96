package labkms

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/kmipserver"
	"github.com/ovh/kmip-go/ttlv"

	"github.com/vmcryptd/vmcryptd/internal/pki"
)

const (
	// handshakeTimeout bounds a client's TLS handshake, so a client that
	// connects and stays silent cannot pin a goroutine.
	handshakeTimeout = 10 * time.Second
	// idleTimeout closes connections with no request for this long. It is
	// well above the kms package's pool idle timeout (30s), so clients
	// normally close first.
	idleTimeout = 5 * time.Minute
	// writeTimeout bounds sending one response.
	writeTimeout = 30 * time.Second
	// shutdownGrace is how long Close lets requests in progress finish.
	shutdownGrace = 5 * time.Second
	// maxMessageSize caps a request; a lab KMS never needs more.
	maxMessageSize = ttlv.DefaultMaxMessageSize
)

// Server is a running lab KMS. Listen makes one; Serve runs it; Close
// stops it. Split this way so callers (and tests on port 0) learn the
// bound address before serving.
//
// The KMIP operations are a kmipserver.BatchExecutor (routing, batches, ID
// placeholders, Discover Versions). The connection loop is ours rather
// than kmipserver.Server: in kmip-go v0.9.2 that server's per-connection
// reader closes the send channel when a client hangs up, racing with the
// response being sent (a data race, and a possible "send on closed
// channel" panic that would take the whole daemon down). It also logs
// through the global slog logger and has no handshake or idle timeouts.
type Server struct {
	paths   Paths
	ln      net.Listener
	tlsCfg  *tls.Config
	handler kmipserver.RequestHandler
	log     *slog.Logger
	ctx     context.Context
	cancel  context.CancelFunc

	mu      sync.Mutex
	closing bool
	conns   map[*serverConn]struct{}
	wg      sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

type serverConn struct {
	c    net.Conn
	busy bool // a request is being processed (guarded by Server.mu)
}

// Listen opens the lab KMS in dir (created by Init) and binds listenAddr
// ("" means DefaultListenAddr; port 0 picks a free port). Clients must
// present a certificate issued by the lab CA with the clientAuth usage.
// A nil logger means slog.Default().
func Listen(dir, listenAddr string, logger *slog.Logger) (*Server, error) {
	if logger == nil {
		logger = slog.Default()
	}
	if listenAddr == "" {
		listenAddr = DefaultListenAddr
	}
	p := PathsFor(dir)
	fail := func(err error) (*Server, error) { return nil, fmt.Errorf("lab kms %s: %w", dir, err) }

	serverPair, err := pki.Load(p.ServerCert, p.ServerKey)
	if err != nil {
		return fail(fmt.Errorf("server certificate (run init first?): %w", err))
	}
	serverCert, err := serverPair.TLSCertificate()
	if err != nil {
		return fail(err)
	}
	clientCAs, err := pki.CertPool(p.CACert)
	if err != nil {
		return fail(fmt.Errorf("CA certificate: %w", err))
	}
	master, err := readMasterKey(p.MasterKey)
	if err != nil {
		return fail(err)
	}
	st, err := openStore(p.Store, master, logger)
	clear(master)
	if err != nil {
		return fail(err)
	}
	ln, err := net.Listen("tcp", listenAddr)
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &handler{store: st, log: logger}
	return &Server{
		paths: p,
		ln:    ln,
		tlsCfg: &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{serverCert},
			ClientCAs:    clientCAs,
			// Verification includes the clientAuth extended key usage.
			ClientAuth: tls.RequireAndVerifyClientCert,
		},
		handler: h.executor(),
		log:     logger,
		ctx:     ctx,
		cancel:  cancel,
		conns:   map[*serverConn]struct{}{},
	}, nil
}

// Addr is the address the server listens on, e.g. "127.0.0.1:5696".
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Paths returns the files of this lab KMS (CA, client certificate...).
func (s *Server) Paths() Paths { return s.paths }

// Serve answers KMIP requests until Close; it then returns nil.
func (s *Server) Serve() error {
	s.log.Info("lab kms serving", "addr", s.Addr(), "dir", s.paths.Dir)
	var delay time.Duration
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if s.isClosing() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of descriptors and the like: back off, do not spin.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("lab kms accept failed; retrying", "err", err, "delay", delay)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("lab kms accept: %w", err)
		}
		delay = 0
		sc := &serverConn{c: c}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			_ = c.Close()
			return nil
		}
		s.conns[sc] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serveConn(sc)
	}
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

type ctxPeer struct{}

// peerCertificates returns the verified client chain of the connection a
// request came on.
func peerCertificates(ctx context.Context) []*x509.Certificate {
	certs, _ := ctx.Value(ctxPeer{}).([]*x509.Certificate)
	return certs
}

func (s *Server) serveConn(sc *serverConn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, sc)
		s.mu.Unlock()
		_ = sc.c.Close()
	}()
	log := s.log.With("remote", sc.c.RemoteAddr().String())

	tc := tls.Server(sc.c, s.tlsCfg)
	_ = tc.SetDeadline(time.Now().Add(handshakeTimeout))
	if err := tc.HandshakeContext(s.ctx); err != nil {
		log.Warn("lab kms: TLS handshake failed", "err", err)
		return
	}
	peers := tc.ConnectionState().PeerCertificates
	ctx := context.WithValue(s.ctx, ctxPeer{}, peers)
	if len(peers) > 0 {
		log = log.With("client", peers[0].Subject.CommonName)
	}
	log.Debug("lab kms: client connected")
	stream := ttlv.NewStream(tc, maxMessageSize)
	for {
		_ = tc.SetDeadline(time.Now().Add(idleTimeout))
		var req kmip.RequestMessage
		err := stream.Recv(&req)
		if err != nil && !ttlv.IsErrEncoding(err) {
			log.Debug("lab kms: connection closed", "err", err)
			return
		}
		s.mu.Lock()
		if s.closing {
			// Close raced with this request; dropping it unprocessed is
			// safe: the client sees a closed connection and may retry.
			s.mu.Unlock()
			return
		}
		sc.busy = true
		s.mu.Unlock()

		var resp *kmip.ResponseMessage
		if err != nil {
			log.Warn("lab kms: undecodable request", "err", err)
			resp = errorResponse(kmip.ResultReasonInvalidMessage, err.Error())
		} else {
			resp = s.handler.HandleRequest(ctx, &req)
		}
		_ = tc.SetDeadline(time.Now().Add(writeTimeout))
		sendErr := stream.Send(resp)

		s.mu.Lock()
		sc.busy = false
		closing := s.closing
		s.mu.Unlock()
		if sendErr != nil {
			log.Debug("lab kms: sending response failed", "err", sendErr)
			return
		}
		if err != nil || closing {
			return
		}
	}
}

// errorResponse is the reply to a message that could not be decoded, so
// there is no batch to answer item by item.
func errorResponse(reason kmip.ResultReason, msg string) *kmip.ResponseMessage {
	return &kmip.ResponseMessage{
		Header: kmip.ResponseHeader{ProtocolVersion: kmip.V1_0, TimeStamp: time.Now(), BatchCount: 1},
		BatchItem: []kmip.ResponseBatchItem{{
			ResultStatus:  kmip.ResultStatusOperationFailed,
			ResultReason:  reason,
			ResultMessage: msg,
		}},
	}
}

// Close stops accepting connections, closes idle ones at once, lets
// requests in progress finish (up to a few seconds) and then closes the
// rest. It is idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closing = true
		err := s.ln.Close()
		for sc := range s.conns {
			if !sc.busy {
				_ = sc.c.Close()
			}
		}
		s.mu.Unlock()

		done := make(chan struct{})
		go func() { s.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(shutdownGrace):
			s.log.Warn("lab kms: requests still running at shutdown; closing their connections")
			s.mu.Lock()
			for sc := range s.conns {
				_ = sc.c.Close()
			}
			s.mu.Unlock()
			<-done
		}
		s.cancel()
		if errors.Is(err, net.ErrClosed) {
			err = nil
		}
		s.closeErr = err
		s.log.Info("lab kms stopped", "addr", s.Addr())
	})
	return s.closeErr
}

// Serve runs the lab KMS in dir on listenAddr until ctx is done, logging
// to slog.Default().
func Serve(ctx context.Context, dir, listenAddr string) error {
	s, err := Listen(dir, listenAddr, nil)
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { _ = s.Close() })
	defer stop()
	serveErr := s.Serve()
	closeErr := s.Close()
	return errors.Join(serveErr, closeErr)
}

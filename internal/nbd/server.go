package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Backend is the block device an export serves. Every method may be
// called concurrently; offsets and lengths are within [0, Size()).
type Backend interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every completed write durable.
	Flush() error
	// Trim discards a range: it may read back as zeros or keep its data.
	Trim(off, n int64) error
	// Zero makes a range read as zeros; punch allows freeing storage.
	Zero(off, n int64, punch bool) error
	// Extents describes [off, off+n) in consecutive extents (State*
	// flags); they may cover less than n, but at least one byte.
	Extents(off, n int64) ([]Extent, error)
	Size() int64
	ReadOnly() bool
}

// Extent is one run of a Backend's block status.
type Extent struct {
	Length int64
	Flags  uint32 // StateHole | StateZero
}

// Export is one named block device.
type Export struct {
	Name        string // "" is the default export
	Description string
	Backend     Backend
}

// Config configures a Server. Zero fields take the defaults below.
type Config struct {
	Export *Export
	// TLS, when set, is required (doc/proto.md FORCEDTLS mode): only
	// NBD_OPT_STARTTLS and NBD_OPT_ABORT are accepted before it. Set
	// ClientAuth to tls.RequireAndVerifyClientCert for mutual TLS.
	TLS *tls.Config
	// MaxPayload caps one request's data (default 32 MiB).
	MaxPayload int
	// MaxInFlight caps concurrent requests per connection (default 64).
	MaxInFlight int
	// MaxBufferBytes caps request buffers per connection (default 64 MiB).
	MaxBufferBytes int64
	// HandshakeTimeout bounds the whole negotiation (default 30 s).
	HandshakeTimeout time.Duration
	// MaxConns caps concurrent connections (default 16).
	MaxConns int
	Log      *slog.Logger
}

const (
	defaultMaxPayload  = 32 << 20
	defaultMaxInFlight = 64
	defaultMaxBuffers  = 64 << 20
	maxOptionLen       = 64 << 10 // longest option data accepted
	maxOptions         = 256      // options per negotiation
	maxNameLen         = 4096     // doc/proto.md string limit
	maxQueries         = 32       // meta context queries per option
	maxDescriptors     = 1 << 16  // block status descriptors per reply
	preferredBlock     = 4096
	holeReadMin        = 64 << 10 // reads from this size report holes
)

// Server serves one export on any number of connections.
type Server struct {
	cfg Config
	log *slog.Logger

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	lns    map[net.Listener]struct{}
	closed bool
	wg     sync.WaitGroup
	pools  bufPools
}

// NewServer returns a server for cfg.Export.
func NewServer(cfg Config) *Server {
	if cfg.MaxPayload <= 0 {
		cfg.MaxPayload = defaultMaxPayload
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = defaultMaxInFlight
	}
	if cfg.MaxBufferBytes < int64(cfg.MaxPayload) {
		cfg.MaxBufferBytes = max(defaultMaxBuffers, int64(cfg.MaxPayload))
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = 16
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, log: log, conns: map[net.Conn]struct{}{}, lns: map[net.Listener]struct{}{}}
}

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Serve accepts connections on l until Close; each is served on its own
// goroutine.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.lns[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.lns, l)
		s.mu.Unlock()
	}()
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		go func() {
			if err := s.ServeConn(c); err != nil {
				s.log.Warn("nbd connection ended", "export", s.cfg.Export.Name, "remote", remoteName(c), "err", err)
			}
		}()
	}
}

func remoteName(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "local"
}

// ServeConn serves one connection until the client disconnects, a
// protocol error ends it, or Close. It closes c.
func (s *Server) ServeConn(c net.Conn) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.Close()
		return ErrServerClosed
	}
	if len(s.conns) >= s.cfg.MaxConns {
		s.mu.Unlock()
		c.Close()
		return fmt.Errorf("refused: %d connections already open", s.cfg.MaxConns)
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	cn := &conn{s: s, raw: c, nc: c}
	defer func() {
		cn.close()
		s.mu.Lock()
		delete(s.conns, c)
		if cn.nc != c {
			delete(s.conns, cn.nc)
		}
		s.mu.Unlock()
		s.wg.Done()
	}()
	cn.r = bufio.NewReaderSize(c, 64<<10)
	err := cn.serve()
	if errors.Is(err, errDone) {
		return nil
	}
	return err
}

// Conns is the number of open connections.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Close stops accepting, closes every connection and waits for their
// handlers to return.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	for l := range s.lns {
		l.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// errDone ends a connection without error (NBD_OPT_ABORT, NBD_CMD_DISC).
var errDone = errors.New("done")

type conn struct {
	s   *Server
	raw net.Conn // as accepted
	nc  net.Conn // raw, or the TLS connection over it
	r   *bufio.Reader

	tlsDone    bool
	structured bool
	metaFor    *string // export name base:allocation was selected for

	closeOnce sync.Once
}

func (c *conn) close() {
	c.closeOnce.Do(func() { c.nc.Close(); c.raw.Close() })
}

func (c *conn) serve() error {
	c.nc.SetDeadline(time.Now().Add(c.s.cfg.HandshakeTimeout))
	var hs [18]byte
	binary.BigEndian.PutUint64(hs[0:], magicNBD)
	binary.BigEndian.PutUint64(hs[8:], magicOpt)
	binary.BigEndian.PutUint16(hs[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(hs[:]); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.r, cf[:]); err != nil {
		return fmt.Errorf("handshake: client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&flagCFixedNewstyle == 0 {
		return errors.New("handshake: client does not speak fixed newstyle")
	}
	if flags&^uint32(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		return fmt.Errorf("handshake: unknown client flags %#x", flags)
	}
	noZeroes := flags&flagCNoZeroes != 0
	exp, err := c.negotiate(noZeroes)
	if err != nil {
		return err
	}
	c.nc.SetDeadline(time.Time{})
	return c.transmit(exp)
}

// option reads one option header and its data.
func (c *conn) option() (opt uint32, data []byte, err error) {
	var h [16]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("negotiation: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != magicOpt {
		return 0, nil, fmt.Errorf("negotiation: bad option magic %#x", m)
	}
	opt = binary.BigEndian.Uint32(h[8:])
	n := binary.BigEndian.Uint32(h[12:])
	if n > maxOptionLen {
		return opt, nil, fmt.Errorf("negotiation: option %d with %d bytes of data (limit %d)", opt, n, maxOptionLen)
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(c.r, data); err != nil {
		return opt, nil, fmt.Errorf("negotiation: option %d data: %w", opt, err)
	}
	return opt, data, nil
}

func (c *conn) reply(opt, typ uint32, data []byte) error {
	b := make([]byte, 20+len(data))
	binary.BigEndian.PutUint64(b[0:], magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	copy(b[20:], data)
	if _, err := c.nc.Write(b); err != nil {
		return fmt.Errorf("negotiation: reply: %w", err)
	}
	return nil
}

func (c *conn) replyErr(opt, typ uint32, msg string) error {
	return c.reply(opt, typ, []byte(msg))
}

// negotiate runs option haggling until NBD_OPT_GO or NBD_OPT_EXPORT_NAME
// picks the export.
func (c *conn) negotiate(noZeroes bool) (*Export, error) {
	cfg := &c.s.cfg
	for range maxOptions {
		opt, data, err := c.option()
		if err != nil {
			return nil, err
		}
		if cfg.TLS != nil && !c.tlsDone && opt != optStartTLS && opt != optAbort {
			if opt == optExportName {
				return nil, errors.New("negotiation: NBD_OPT_EXPORT_NAME before TLS")
			}
			if err := c.replyErr(opt, repErrTLSReqd, "TLS is required (NBD_OPT_STARTTLS)"); err != nil {
				return nil, err
			}
			continue
		}
		switch opt {
		case optAbort:
			c.reply(opt, repAck, nil) // the client may already be gone
			return nil, errDone
		case optStartTLS:
			if err := c.startTLS(data); err != nil {
				return nil, err
			}
		case optExportName:
			exp, ok := c.lookup(string(data))
			if !ok {
				return nil, fmt.Errorf("negotiation: no export named %q", data)
			}
			b := make([]byte, 10, 10+124)
			binary.BigEndian.PutUint64(b[0:], uint64(exp.Backend.Size()))
			binary.BigEndian.PutUint16(b[8:], c.tflags(exp))
			if !noZeroes {
				b = b[:10+124]
			}
			if _, err := c.nc.Write(b); err != nil {
				return nil, fmt.Errorf("negotiation: %w", err)
			}
			return exp, nil
		case optList:
			if len(data) != 0 {
				if err := c.replyErr(opt, repErrInvalid, "NBD_OPT_LIST takes no data"); err != nil {
					return nil, err
				}
				continue
			}
			name := cfg.Export.Name
			b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
			b = append(b, name...)
			if err := c.reply(opt, repServer, b); err != nil {
				return nil, err
			}
			if err := c.reply(opt, repAck, nil); err != nil {
				return nil, err
			}
		case optStructuredRepl:
			if len(data) != 0 {
				if err := c.replyErr(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data"); err != nil {
					return nil, err
				}
				continue
			}
			c.structured = true
			if err := c.reply(opt, repAck, nil); err != nil {
				return nil, err
			}
		case optListMetaCtx, optSetMetaCtx:
			if err := c.metaContext(opt, data); err != nil {
				return nil, err
			}
		case optInfo, optGo:
			exp, err := c.infoGo(opt, data)
			if err != nil {
				return nil, err
			}
			if exp != nil && opt == optGo {
				return exp, nil
			}
		default:
			if err := c.replyErr(opt, repErrUnsup, "option not supported"); err != nil {
				return nil, err
			}
		}
	}
	return nil, fmt.Errorf("negotiation: more than %d options", maxOptions)
}

func (c *conn) startTLS(data []byte) error {
	cfg := c.s.cfg.TLS
	switch {
	case cfg == nil:
		return c.replyErr(optStartTLS, repErrPolicy, "TLS is not offered on this export")
	case c.tlsDone:
		return c.replyErr(optStartTLS, repErrInvalid, "TLS is already negotiated")
	case len(data) != 0:
		return c.replyErr(optStartTLS, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case c.r.Buffered() != 0:
		// Bytes sent ahead of the TLS handshake would be taken as
		// plaintext commands: a downgrade attempt.
		return errors.New("negotiation: data sent before the TLS handshake")
	}
	if err := c.reply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	tc := tls.Server(c.raw, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), c.s.cfg.HandshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("negotiation: TLS handshake: %w", err)
	}
	c.s.mu.Lock()
	c.s.conns[tc] = struct{}{}
	c.s.mu.Unlock()
	c.nc = tc
	c.r = bufio.NewReaderSize(tc, 64<<10)
	c.tlsDone = true
	// doc/proto.md: state negotiated before STARTTLS is forgotten.
	c.structured = false
	c.metaFor = nil
	return nil
}

// lookup finds the export by name: the export's own, or "" for the
// default export.
func (c *conn) lookup(name string) (*Export, bool) {
	e := c.s.cfg.Export
	if name == e.Name || name == "" {
		return e, true
	}
	return nil, false
}

func (c *conn) tflags(exp *Export) uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagCanMultiConn)
	if exp.Backend.ReadOnly() {
		f |= tflagReadOnly
	} else {
		f |= tflagSendTrim | tflagSendWriteZer
	}
	if c.structured {
		f |= tflagSendDF
	}
	return f
}

// parseName reads a 32-bit length and a string from b.
func parseName(b []byte) (string, []byte, bool) {
	if len(b) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(b)
	if n > maxNameLen || uint64(n) > uint64(len(b)-4) {
		return "", nil, false
	}
	return string(b[4 : 4+n]), b[4+n:], true
}

// infoGo answers NBD_OPT_INFO / NBD_OPT_GO; a nil export with a nil
// error means an error reply was sent.
func (c *conn) infoGo(opt uint32, data []byte) (*Export, error) {
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 2 {
		return nil, c.replyErr(opt, repErrInvalid, "malformed request")
	}
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return nil, c.replyErr(opt, repErrInvalid, "malformed information request list")
	}
	exp, ok := c.lookup(name)
	if !ok {
		return nil, c.replyErr(opt, repErrUnknown, "no such export")
	}
	var wantName, wantDesc bool
	for i := range nreq {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, uint64(exp.Backend.Size()))
	info = binary.BigEndian.AppendUint16(info, c.tflags(exp))
	if err := c.reply(opt, repInfo, info); err != nil {
		return nil, err
	}
	bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, 1)
	bs = binary.BigEndian.AppendUint32(bs, preferredBlock)
	bs = binary.BigEndian.AppendUint32(bs, uint32(c.s.cfg.MaxPayload))
	if err := c.reply(opt, repInfo, bs); err != nil {
		return nil, err
	}
	if wantName {
		if err := c.reply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoName), exp.Name...)); err != nil {
			return nil, err
		}
	}
	if wantDesc && exp.Description != "" {
		if err := c.reply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoDescription), exp.Description...)); err != nil {
			return nil, err
		}
	}
	if opt == optGo && c.metaFor != nil && *c.metaFor != name {
		c.metaFor = nil // contexts were set for another export name
	}
	if err := c.reply(opt, repAck, nil); err != nil {
		return nil, err
	}
	return exp, nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and _SET_: the one
// context is base:allocation.
func (c *conn) metaContext(opt uint32, data []byte) error {
	if opt == optSetMetaCtx {
		c.metaFor = nil // replaced even when the option fails
	}
	if !c.structured {
		return c.replyErr(opt, repErrInvalid, "structured replies must be negotiated first")
	}
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 4 {
		return c.replyErr(opt, repErrInvalid, "malformed request")
	}
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	if nq > maxQueries {
		return c.replyErr(opt, repErrTooBig, "too many queries")
	}
	match := opt == optListMetaCtx && nq == 0
	for range nq {
		var q string
		if q, rest, ok = parseName(rest); !ok {
			return c.replyErr(opt, repErrInvalid, "malformed query")
		}
		if q == metaBaseAllocation || (opt == optListMetaCtx && q == "base:") {
			match = true
		}
	}
	if len(rest) != 0 {
		return c.replyErr(opt, repErrInvalid, "trailing bytes after the queries")
	}
	if _, ok := c.lookup(name); !ok {
		return c.replyErr(opt, repErrUnknown, "no such export")
	}
	if match {
		id := uint32(0)
		if opt == optSetMetaCtx {
			id = metaBaseAllocationID
			c.metaFor = &name
		}
		if err := c.reply(opt, repMetaContext, append(binary.BigEndian.AppendUint32(nil, id), metaBaseAllocation...)); err != nil {
			return err
		}
	}
	return c.reply(opt, repAck, nil)
}

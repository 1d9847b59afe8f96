package kms

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/kmipclient"
	"github.com/ovh/kmip-go/ttlv"
)

// syncTransport is a plain request/response KMIP transport over one TLS
// connection, plugged into kmipclient through WithTransportBuilder.
//
// Why not kmipclient's own stream transport: in kmip-go v0.9.2 its reader
// goroutine closes the send channel when the peer hangs up, racing with a
// concurrent send (the race detector flags it, and a send on the closed
// channel would panic). A server refusing our certificate or restarting
// triggers exactly that. KMIP over TLS is strictly one request, one
// response, so a synchronous transport is also simpler: deadlines come from
// the context, and a broken connection is simply closed.
type syncTransport struct {
	dial    func(ctx context.Context) (net.Conn, error)
	maxSize int

	mu       sync.Mutex
	conn     net.Conn
	used     bool // a round trip completed on conn
	poisoned bool // a cancellation hook may have set a past deadline on conn
	closed   bool
}

var _ kmipclient.Transport = (*syncTransport)(nil)

func newSyncTransport(ctx context.Context, dial func(ctx context.Context) (net.Conn, error), maxSize int) (*syncTransport, error) {
	t := &syncTransport{dial: dial, maxSize: maxSize}
	c, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	t.conn = c
	return t, nil
}

// RoundTrip sends msg and reads the response. If a connection that served
// earlier requests turns out closed by the server (idle timeout, restart)
// before any response byte arrives, the request never reached the server:
// it is sent once more on a fresh connection.
func (t *syncTransport) RoundTrip(ctx context.Context, msg *kmip.RequestMessage) (*kmip.ResponseMessage, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, net.ErrClosed
	}
	if t.conn == nil {
		c, err := t.dial(ctx)
		if err != nil {
			return nil, err
		}
		t.conn, t.used = c, false
	}
	resp, got, err := t.exchange(ctx, msg)
	if err != nil && t.used && got == 0 && isGenericClosed(err) && ctx.Err() == nil {
		t.drop()
		c, derr := t.dial(ctx)
		if derr != nil {
			return nil, derr
		}
		t.conn = c
		resp, _, err = t.exchange(ctx, msg)
	}
	if err != nil || t.poisoned {
		// A poisoned connection answered, but its next I/O could hit the
		// deadline set by a late cancellation hook: start afresh.
		t.drop()
	}
	if err != nil {
		return nil, err
	}
	t.used = true
	return resp, nil
}

func (t *syncTransport) drop() {
	if t.conn != nil {
		_ = t.conn.Close()
	}
	t.conn, t.used, t.poisoned = nil, false, false
}

// exchange does one request/response; got counts response bytes read.
func (t *syncTransport) exchange(ctx context.Context, msg *kmip.RequestMessage) (*kmip.ResponseMessage, int, error) {
	c := t.conn
	dl, _ := ctx.Deadline() // zero means none
	if err := c.SetDeadline(dl); err != nil {
		return nil, 0, err
	}
	// Cancellation without a deadline still has to interrupt blocked I/O.
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		if !stop() && ctx.Err() != nil {
			t.poisoned = true
		}
	}()

	cr := &countingReader{Conn: c}
	stream := ttlv.NewStream(cr, t.maxSize)
	var err error
	if err = stream.Send(msg); err == nil {
		var resp kmip.ResponseMessage
		if err = stream.Recv(&resp); err == nil {
			return &resp, cr.n, nil
		}
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// The connection deadline is the context's (or was forced by its
		// cancellation): report it as such.
		err = context.DeadlineExceeded
		if ctx.Err() != nil {
			err = ctx.Err()
		}
	}
	if errors.Is(err, ttlv.ErrMessageTooLarge) {
		err = kmipclient.ErrResponseTooLarge
	}
	return nil, cr.n, err
}

func (t *syncTransport) Clone(ctx context.Context) (kmipclient.Transport, error) {
	return newSyncTransport(ctx, t.dial, t.maxSize)
}

func (t *syncTransport) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	t.drop()
	return nil
}

type countingReader struct {
	net.Conn
	n int
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n += n
	if err == nil && n == 0 {
		// ttlv.Stream treats (0, nil) as end of stream; make it explicit.
		err = io.EOF
	}
	return n, err
}

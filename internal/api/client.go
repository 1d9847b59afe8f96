package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
)

// EnvSocket names the environment variable with the daemon's socket path.
const EnvSocket = "VMCRYPTD_SOCKET"

// Client talks to the daemon over its unix socket.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client for the daemon listening on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}
	return &Client{socket: socket, hc: &http.Client{Transport: tr}}
}

// DeniedError is returned for HTTP 403.
type DeniedError struct {
	Msg              string
	MissingPrivilege string
}

func (e *DeniedError) Error() string { return e.Msg }

// StatusError is any other non-2xx answer.
type StatusError struct {
	Code int
	Kind ErrorKind
	Msg  string
}

func (e *StatusError) Error() string { return e.Msg }

// Stream sends req and reads a streamed answer, passing each progress
// line to onProgress, and decodes the final result into resp. Answers that
// are not streamed (errors before the operation started) are handled like
// Do.
func (c *Client) Stream(ctx context.Context, method, path string, req, resp any, onProgress func(json.RawMessage)) error {
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	hr, err := http.NewRequestWithContext(ctx, method, "http://vmcryptd"+Prefix+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	hr.Header.Set("Content-Type", "application/json")
	r, err := c.hc.Do(hr)
	if err != nil {
		return c.transportError(err)
	}
	defer r.Body.Close()
	if r.Header.Get("Content-Type") != "application/x-ndjson" {
		return c.finish(r, resp)
	}
	dec := json.NewDecoder(r.Body)
	for {
		var line StreamLine
		if err := dec.Decode(&line); err != nil {
			return fmt.Errorf("daemon at %s: stream ended without a result: %w%w", c.socket, err, unreachableMark{})
		}
		switch {
		case line.Error != "":
			if line.Code == http.StatusForbidden {
				return &DeniedError{Msg: line.Error}
			}
			return &StatusError{Code: line.Code, Kind: line.Kind, Msg: line.Error}
		case line.Result != nil:
			if resp != nil {
				return json.Unmarshal(line.Result, resp)
			}
			return nil
		case line.Progress != nil && onProgress != nil:
			onProgress(line.Progress)
		}
	}
}

// ErrUnreachable is wrapped by every error of a request that did not reach
// the daemon or lost it before an answer.
var ErrUnreachable = errors.New("daemon unreachable")

func (c *Client) transportError(err error) error {
	var ne *net.OpError
	if errors.As(err, &ne) && (errors.Is(err, os.ErrNotExist) || strings.Contains(err.Error(), "connection refused")) {
		return fmt.Errorf("daemon not running at %s (start it with 'vmcryptd serve' or 'vmcryptd lab up', or set $%s)%w", c.socket, EnvSocket, unreachableMark{})
	}
	return fmt.Errorf("daemon at %s: %w%w", c.socket, err, unreachableMark{})
}

// unreachableMark adds ErrUnreachable to an error without changing its
// message.
type unreachableMark struct{}

func (unreachableMark) Error() string        { return "" }
func (unreachableMark) Is(target error) bool { return target == ErrUnreachable }

// Do sends req (JSON, may be nil) to method path and decodes the answer
// into resp (may be nil).
func (c *Client) Do(ctx context.Context, method, path string, req, resp any) error {
	var body io.Reader
	if req != nil {
		b, err := json.Marshal(req)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	hr, err := http.NewRequestWithContext(ctx, method, "http://vmcryptd"+Prefix+path, body)
	if err != nil {
		return err
	}
	if req != nil {
		hr.Header.Set("Content-Type", "application/json")
	}
	r, err := c.hc.Do(hr)
	if err != nil {
		return c.transportError(err)
	}
	defer r.Body.Close()
	return c.finish(r, resp)
}

func (c *Client) finish(r *http.Response, resp any) error {
	raw, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("daemon at %s: %w", c.socket, err)
	}
	if r.StatusCode/100 != 2 {
		var e Error
		if json.Unmarshal(raw, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(raw))
		}
		if r.StatusCode == http.StatusForbidden {
			return &DeniedError{Msg: e.Error, MissingPrivilege: e.MissingPrivilege}
		}
		return &StatusError{Code: r.StatusCode, Kind: e.Kind, Msg: e.Error}
	}
	if resp != nil {
		if err := json.Unmarshal(raw, resp); err != nil {
			return fmt.Errorf("daemon at %s: bad response: %w", c.socket, err)
		}
	}
	return nil
}

package kms

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/ttlv"
)

// Sentinel causes. Every error returned by a Provider is an *Error whose
// chain contains one of these where the cause is known, so callers can use
// errors.Is without parsing text.
var (
	// ErrNotFound: the server has no object with that id (or, for PyKMIP,
	// the object belongs to another client certificate).
	ErrNotFound = errors.New("key not found")
	// ErrKeyRevoked: the key is Deactivated or Compromised.
	ErrKeyRevoked = errors.New("key is revoked")
	// ErrKeyDestroyed: the key material is gone.
	ErrKeyDestroyed = errors.New("key is destroyed")
	// ErrKeyNotActive: the key exists but was never activated (Pre-Active).
	ErrKeyNotActive = errors.New("key is not active")
	// ErrWrongKey: the object is not a 256-bit AES symmetric key.
	ErrWrongKey = errors.New("wrong key type")
	// ErrUnreachable: no TCP connection could be made.
	ErrUnreachable = errors.New("server unreachable")
	// ErrTimeout: the server did not answer in time.
	ErrTimeout = errors.New("timed out")
	// ErrServerCert: the server's certificate did not verify against ca_file.
	ErrServerCert = errors.New("tls: server certificate rejected")
	// ErrClientCertRejected: the server refused our client certificate.
	ErrClientCertRejected = errors.New("tls: server rejected our client certificate")
	// ErrNotSupported: the server does not implement the operation.
	ErrNotSupported = errors.New("operation not supported by server")
	// ErrServer: the server reported another KMIP failure.
	ErrServer = errors.New("server error")
	// ErrClosed: the provider was closed.
	ErrClosed = errors.New("provider closed")
)

// Error is what every Provider operation returns on failure. It prints as a
// single line naming the provider, the server(s) and the cause, e.g.
//
//	kms provider "lab": server 127.0.0.1:5696: tls: server certificate rejected: x509: certificate signed by unknown authority
//
// It never contains key material: causes are built from status codes,
// server messages and network errors only.
type Error struct {
	Provider string
	// Op is what was attempted, e.g. `get key "42"`.
	Op string
	// Servers holds one entry per server that was tried (the last attempt
	// for each); for server-side refusals it holds just the server that
	// answered.
	Servers []ServerError
	// Err is set for failures not tied to a server (closed provider,
	// context cancelled before any server was tried).
	Err error
}

// ServerError is one server's part of an Error.
type ServerError struct {
	Addr string
	Err  error
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "kms provider %q: ", e.Provider)
	switch {
	case len(e.Servers) == 1:
		fmt.Fprintf(&b, "server %s: ", e.Servers[0].Addr)
		if e.Op != "" {
			b.WriteString(e.Op + ": ")
		}
		b.WriteString(oneLine(e.Servers[0].Err))
	case len(e.Servers) > 1:
		if e.Op != "" {
			b.WriteString(e.Op + ": ")
		}
		fmt.Fprintf(&b, "all %d servers failed: ", len(e.Servers))
		for i, s := range e.Servers {
			if i > 0 {
				b.WriteString("; ")
			}
			fmt.Fprintf(&b, "server %s: %s", s.Addr, oneLine(s.Err))
		}
	default:
		if e.Op != "" {
			b.WriteString(e.Op + ": ")
		}
		b.WriteString(oneLine(e.Err))
	}
	return b.String()
}

// Unwrap exposes every cause so errors.Is(err, kms.ErrNotFound) works.
func (e *Error) Unwrap() []error {
	out := make([]error, 0, len(e.Servers)+1)
	for _, s := range e.Servers {
		out = append(out, s.Err)
	}
	if e.Err != nil {
		out = append(out, e.Err)
	}
	return out
}

func oneLine(err error) string {
	if err == nil {
		return "unknown error"
	}
	return strings.Join(strings.Fields(err.Error()), " ")
}

// kmipError is a failure reported by the server in a response batch item.
// Such errors come from a live, authenticated server, so they are never a
// reason to fail over (the other servers hold the same keys).
type kmipError struct {
	Operation kmip.Operation
	Reason    kmip.ResultReason
	Message   string
}

func (e *kmipError) Error() string {
	msg := fmt.Sprintf("KMIP %s failed: %s", ttlv.EnumStr(e.Operation), ttlv.EnumStr(e.Reason))
	if m := strings.TrimSpace(e.Message); m != "" {
		msg += ": " + m
	}
	return msg
}

func (e *kmipError) Is(target error) bool {
	switch target {
	case ErrNotFound:
		return e.Reason == kmip.ResultReasonItemNotFound
	case ErrNotSupported:
		return e.Reason == kmip.ResultReasonOperationNotSupported
	case ErrClientCertRejected:
		return e.Reason == kmip.ResultReasonAuthenticationNotSuccessful
	case ErrServer:
		return true
	}
	return false
}

// causeError pairs a sentinel with a detail: it prints "sentinel: detail"
// (or "sentinel (detail)" style when built so) and matches the sentinel and
// the wrapped error with errors.Is/As.
type causeError struct {
	kind   error
	detail string
	err    error
}

func (e *causeError) Error() string {
	s := e.kind.Error()
	if e.detail != "" {
		s += ": " + e.detail
	}
	if e.err != nil {
		s += ": " + e.err.Error()
	}
	return s
}

func (e *causeError) Unwrap() []error {
	if e.err == nil {
		return []error{e.kind}
	}
	return []error{e.kind, e.err}
}

func cause(kind error, detail string, err error) error {
	return &causeError{kind: kind, detail: detail, err: err}
}

// authFailedText is how kmipclient spells a KMIP authentication failure in
// the (unstructured) error of its version negotiation.
const authFailedText = `reason="AuthenticationNotSuccessful")`

// classifyTransport turns a connection-level error into a cause that says
// what went wrong in operator terms.
func classifyTransport(err error) error {
	if err == nil {
		return nil
	}
	var ce *causeError
	if errors.As(err, &ce) {
		return err
	}
	var (
		unknownAuth x509.UnknownAuthorityError
		hostErr     x509.HostnameError
		invalidCert x509.CertificateInvalidError
		verifyErr   *tls.CertificateVerificationError
		opErr       *net.OpError
	)
	switch {
	case errors.As(err, &unknownAuth), errors.As(err, &hostErr), errors.As(err, &invalidCert), errors.As(err, &verifyErr):
		return cause(ErrServerCert, "", unwrapTLSVerify(err))
	case errors.As(err, &opErr) && opErr.Op == "remote error":
		// A TLS alert from the server. With TLS 1.3 the client finishes its
		// handshake before the server has checked the client certificate, so
		// the refusal surfaces as an alert on the first read.
		if isCertAlert(opErr.Err.Error()) {
			return cause(ErrClientCertRejected, "", opErr)
		}
		if strings.Contains(opErr.Err.Error(), "handshake failure") {
			return cause(ErrServer, handshakeHint, opErr)
		}
		return cause(ErrServer, "TLS alert from server", opErr)
	case strings.Contains(err.Error(), authFailedText):
		// kmipclient reports a refused Discover Versions as text only.
		// PyKMIP answers so when the client certificate has no extended key
		// usage extension at all (one without clientAuth fails in TLS).
		_, serverMsg, _ := strings.Cut(err.Error(), authFailedText)
		return cause(ErrClientCertRejected, "KMIP AuthenticationNotSuccessful: "+strings.TrimSpace(serverMsg), nil)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded), isTimeout(err):
		// Before the "dial" case: a connect that times out is a timeout
		// (black-holed address, overloaded server), not a refusal.
		return cause(ErrTimeout, "", err)
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return cause(ErrUnreachable, "", err)
	case errors.As(err, &opErr) && opErr.Op == "dial":
		return cause(ErrUnreachable, "", err)
	}
	return err
}

// handshakeHint explains a TLS handshake_failure alert: mostly no cipher
// suite in common (PyKMIP with an RSA certificate offers only CBC-SHA256
// and RSA key exchange suites, which Go does not enable by default).
const handshakeHint = "TLS handshake failure: the server may accept no cipher suite this client offers (a server with an RSA certificate may need tls_cipher_suites, e.g. TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256)"

// unwrapTLSVerify drops Go's "tls: failed to verify certificate: " wrapper
// so the message reads "server certificate rejected: x509: ...".
func unwrapTLSVerify(err error) error {
	var verifyErr *tls.CertificateVerificationError
	if errors.As(err, &verifyErr) && verifyErr.Err != nil {
		return verifyErr.Err
	}
	return err
}

func isCertAlert(alert string) bool {
	for _, s := range []string{"bad certificate", "unknown certificate authority", "certificate required",
		"unknown certificate", "unsupported certificate", "certificate expired", "certificate revoked", "access denied"} {
		if strings.Contains(alert, s) {
			return true
		}
	}
	return false
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func isGenericClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrClosedPipe) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

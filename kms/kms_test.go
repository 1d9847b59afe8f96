package kms_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/ovh/kmip-go/kmipclient"
	"github.com/ovh/kmip-go/ttlv"

	"github.com/vmcryptd/vmcryptd/internal/pki"
	"github.com/vmcryptd/vmcryptd/kms"
	"github.com/vmcryptd/vmcryptd/kms/labkms"
)

// quietLogger keeps test output readable; set KMS_TEST_LOG=1 to see logs.
func quietLogger() *slog.Logger {
	if os.Getenv("KMS_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// lab is an in-process lab KMS that a test can stop and restart on the
// same address.
type lab struct {
	t    *testing.T
	dir  string
	addr string
	srv  *labkms.Server
	done chan error
}

func newLab(t *testing.T) *lab {
	t.Helper()
	dir := t.TempDir()
	if err := labkms.Init(dir); err != nil {
		t.Fatal(err)
	}
	l := &lab{t: t, dir: dir, addr: "127.0.0.1:0"}
	l.start()
	t.Cleanup(l.stop)
	return l
}

func (l *lab) start() {
	l.t.Helper()
	var (
		srv *labkms.Server
		err error
	)
	// After a stop, the port may take a moment to be free again.
	for i := 0; i < 50; i++ {
		srv, err = labkms.Listen(l.dir, l.addr, quietLogger())
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		l.t.Fatal(err)
	}
	l.srv, l.addr = srv, srv.Addr()
	l.done = make(chan error, 1)
	go func() { l.done <- srv.Serve() }()
}

func (l *lab) stop() {
	if l.srv == nil {
		return
	}
	if err := l.srv.Close(); err != nil {
		l.t.Errorf("lab kms close: %v", err)
	}
	if err := <-l.done; err != nil {
		l.t.Errorf("lab kms serve: %v", err)
	}
	l.srv = nil
}

func (l *lab) config(name string) kms.Config {
	cfg := labkms.PathsFor(l.dir).ProviderConfig(name, l.addr)
	cfg.RetryBackoff = 20 * time.Millisecond
	// Generous: CI machines are small and often busy.
	cfg.ConnectTimeout = 5 * time.Second
	cfg.Timeout = 10 * time.Second
	return cfg
}

func newProvider(t *testing.T, cfg kms.Config) *kms.Provider {
	t.Helper()
	p, err := kms.New(cfg, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// checkOneLine asserts the properties every provider error must have.
func checkOneLine(t *testing.T, err error, mustContain ...string) {
	t.Helper()
	if err == nil {
		t.Fatal("expected an error")
	}
	msg := err.Error()
	if strings.ContainsAny(msg, "\n\r") {
		t.Errorf("error is not one line: %q", msg)
	}
	for _, s := range mustContain {
		if !strings.Contains(msg, s) {
			t.Errorf("error %q does not contain %q", msg, s)
		}
	}
}

func TestKeyLifecycle(t *testing.T) {
	l := newLab(t)
	p := newProvider(t, l.config("lab"))
	ctx := testCtx(t)

	id, err := p.CreateKey(ctx, "vm-42")
	if err != nil {
		t.Fatal(err)
	}
	key, err := p.GetKey(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if len(key) != 32 || bytes.Equal(key, make([]byte, 32)) {
		t.Fatalf("GetKey returned %d bytes (all zero: %v)", len(key), bytes.Equal(key, make([]byte, 32)))
	}
	again, err := p.GetKey(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(key, again) {
		t.Fatal("two GetKey calls returned different keys")
	}
	if st, err := p.KeyState(ctx, id); err != nil || st != kms.StateActive {
		t.Fatalf("KeyState = %v, %v; want Active", st, err)
	}

	// A second key under the same name: Locate returns both, newest first.
	id2, err := p.CreateKey(ctx, "vm-42")
	if err != nil {
		t.Fatal(err)
	}
	ids, err := p.Locate(ctx, "vm-42")
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != 2 || ids[0] != id2 || ids[1] != id {
		t.Fatalf("Locate = %v, want [%s %s]", ids, id2, id)
	}
	if ids, err := p.Locate(ctx, "no-such-name"); err != nil || len(ids) != 0 {
		t.Fatalf("Locate(no-such-name) = %v, %v", ids, err)
	}

	if err := p.Revoke(ctx, id, kms.RevokeSuperseded); err != nil {
		t.Fatal(err)
	}
	if st, err := p.KeyState(ctx, id); err != nil || st != kms.StateDeactivated {
		t.Fatalf("KeyState after revoke = %v, %v; want Deactivated", st, err)
	}
	_, err = p.GetKey(ctx, id)
	if !errors.Is(err, kms.ErrKeyRevoked) {
		t.Fatalf("GetKey on revoked key: %v, want ErrKeyRevoked", err)
	}
	checkOneLine(t, err, `kms provider "lab"`, "server "+l.addr, "key is revoked", "Deactivated", id)
	t.Logf("revoked: %v", err)
	// A revoked key may still unwrap: GetKeyState hands it out with its
	// state (issue 11 item 5).
	if k, st, err := p.GetKeyState(ctx, id); err != nil || st != kms.StateDeactivated || !bytes.Equal(k, key) {
		t.Fatalf("GetKeyState on a Deactivated key = %v, %v; want the key and Deactivated", st, err)
	}
	if _, st, err := p.FetchKEK(ctx, id); err != nil || st != "Deactivated" {
		t.Fatalf("FetchKEK on a Deactivated key = %q, %v", st, err)
	}

	if err := p.Destroy(ctx, id); err != nil {
		t.Fatal(err)
	}
	if st, err := p.KeyState(ctx, id); err != nil || st != kms.StateDestroyed {
		t.Fatalf("KeyState after destroy = %v, %v; want Destroyed", st, err)
	}
	_, err = p.GetKey(ctx, id)
	if !errors.Is(err, kms.ErrKeyDestroyed) {
		t.Fatalf("GetKey on destroyed key: %v, want ErrKeyDestroyed", err)
	}
	checkOneLine(t, err, "key is destroyed")
	if k, _, err := p.GetKeyState(ctx, id); !errors.Is(err, kms.ErrKeyDestroyed) || k != nil {
		t.Fatalf("GetKeyState on a destroyed key: %v", err)
	}
	// Destroying twice is fine.
	if err := p.Destroy(ctx, id); err != nil {
		t.Fatalf("second Destroy: %v", err)
	}

	// Destroy of an Active key revokes it first.
	if err := p.Destroy(ctx, id2); err != nil {
		t.Fatal(err)
	}
	if st, _ := p.KeyState(ctx, id2); st != kms.StateDestroyed {
		t.Fatalf("state after Destroy of Active key = %v", st)
	}

	// Compromise.
	id3, err := p.CreateKey(ctx, "vm-43")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Revoke(ctx, id3, kms.RevokeKeyCompromise); err != nil {
		t.Fatal(err)
	}
	if _, err := p.GetKey(ctx, id3); !errors.Is(err, kms.ErrKeyRevoked) || !strings.Contains(err.Error(), "Compromised") {
		t.Fatalf("GetKey on compromised key: %v", err)
	}
	if k, st, err := p.GetKeyState(ctx, id3); err != nil || st != kms.StateCompromised || len(k) != kms.KEKBits/8 {
		t.Fatalf("GetKeyState on a Compromised key = %v, %v", st, err)
	}
	if err := p.Destroy(ctx, id3); err != nil {
		t.Fatal(err)
	}
	if st, _ := p.KeyState(ctx, id3); st != kms.StateDestroyedCompromised {
		t.Fatalf("state = %v, want Destroyed Compromised", st)
	}

	_, err = p.GetKey(ctx, "does-not-exist")
	if !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("GetKey(unknown) = %v, want ErrNotFound", err)
	}
	checkOneLine(t, err, "key not found", "does-not-exist")
	t.Logf("not found: %v", err)
	if err := p.Revoke(ctx, "does-not-exist", kms.RevokeUnspecified); !errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("Revoke(unknown) = %v", err)
	}
	if err := p.Revoke(ctx, id2, "bogus"); err == nil {
		t.Fatal("Revoke with an unknown reason succeeded")
	}
}

func TestStatusLab(t *testing.T) {
	l := newLab(t)
	cfg := l.config("lab")
	cfg.Servers = append(cfg.Servers, deadAddr(t))
	p := newProvider(t, cfg)
	st := p.Status(testCtx(t))
	if len(st) != 2 {
		t.Fatalf("Status returned %d entries", len(st))
	}
	live, dead := st[0], st[1]
	if !live.Reachable || !live.TLSOK || !live.ServerCertOK || !live.ClientCertOK || live.Error != "" {
		t.Fatalf("live server status: %+v", live)
	}
	if live.KMIPVersion != "1.4" || live.Vendor != labkms.VendorIdentification || len(live.ServerVersions) != 5 {
		t.Fatalf("live server status: %+v", live)
	}
	if live.Latency <= 0 || live.TLSVersion == "" {
		t.Fatalf("live server status: %+v", live)
	}
	t.Logf("live: %+v", live)
	t.Logf("dead: %+v", dead)
	if dead.Reachable || dead.TLSOK || dead.Error == "" {
		t.Fatalf("dead server status: %+v", dead)
	}
	if !strings.Contains(dead.Error, "server "+dead.Address) || !strings.Contains(dead.Error, "connection refused") {
		t.Fatalf("dead server error: %q", dead.Error)
	}
}

// deadAddr returns a loopback address with nothing listening.
func deadAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestFailover(t *testing.T) {
	l := newLab(t)
	dead := deadAddr(t)
	cfg := l.config("lab")
	cfg.Servers = []string{dead, l.addr}
	p := newProvider(t, cfg)
	ctx := testCtx(t)

	id, err := p.CreateKey(ctx, "failover")
	if err != nil {
		t.Fatalf("CreateKey with first server dead: %v", err)
	}
	for i := 0; i < 5; i++ {
		if _, err := p.GetKey(ctx, id); err != nil {
			t.Fatalf("GetKey %d: %v", i, err)
		}
	}
	st := p.Status(ctx)
	if st[0].Reachable || !st[1].TLSOK {
		t.Fatalf("Status: %+v", st)
	}
}

func TestOutageAndRecovery(t *testing.T) {
	l := newLab(t)
	cfg := l.config("lab")
	cfg.Retries = 1
	p := newProvider(t, cfg)
	ctx := testCtx(t)

	id, err := p.CreateKey(ctx, "outage")
	if err != nil {
		t.Fatal(err)
	}
	want, err := p.GetKey(ctx, id)
	if err != nil {
		t.Fatal(err)
	}

	l.stop()
	start := time.Now()
	_, err = p.GetKey(ctx, id)
	if !errors.Is(err, kms.ErrUnreachable) {
		t.Fatalf("GetKey during outage: %v, want ErrUnreachable", err)
	}
	checkOneLine(t, err, `kms provider "lab"`, "server "+l.addr, "connection refused")
	t.Logf("error during outage: %v", err)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("failing during an outage took %v", d)
	}
	if _, err := p.CreateKey(ctx, "during-outage"); err == nil {
		t.Fatal("CreateKey during outage succeeded")
	}

	// Same port, same directory: the keys survived and the very same
	// provider reconnects.
	l.start()
	got, err := p.GetKey(ctx, id)
	if err != nil {
		t.Fatalf("GetKey after restart: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("key changed across a server restart")
	}
	if _, err := p.CreateKey(ctx, "after-outage"); err != nil {
		t.Fatalf("CreateKey after restart: %v", err)
	}
}

// TestPooledConnectionSurvivesRestart: a pooled connection whose server
// went away and came back must not surface an error.
func TestPooledConnectionSurvivesRestart(t *testing.T) {
	l := newLab(t)
	p := newProvider(t, l.config("lab"))
	ctx := testCtx(t)
	id, err := p.CreateKey(ctx, "pool")
	if err != nil {
		t.Fatal(err)
	}
	l.stop()
	l.start()
	if _, err := p.GetKey(ctx, id); err != nil {
		t.Fatalf("GetKey over a stale pooled connection: %v", err)
	}
}

func TestConcurrentUse(t *testing.T) {
	l := newLab(t)
	cfg := l.config("lab")
	cfg.PoolSize = 2
	p := newProvider(t, cfg)
	ctx := testCtx(t)
	id, err := p.CreateKey(ctx, "concurrent")
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 16)
	for i := 0; i < cap(errs); i++ {
		go func() {
			k, err := p.GetKey(ctx, id)
			if err == nil && len(k) != 32 {
				err = errors.New("short key")
			}
			errs <- err
		}()
	}
	for i := 0; i < cap(errs); i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func TestTLSRefusals(t *testing.T) {
	l := newLab(t)
	// A second, unrelated PKI: its CA does not know the lab server, and the
	// lab CA does not know its client.
	other := t.TempDir()
	if err := labkms.Init(other); err != nil {
		t.Fatal(err)
	}
	otherPaths := labkms.PathsFor(other)
	labPaths := labkms.PathsFor(l.dir)

	// A client certificate from the lab CA but without the clientAuth EKU.
	ca, err := pki.Load(labPaths.CACert, labPaths.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	srvLike, err := ca.IssueServer("not-a-client", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	noEKUCert, noEKUKey := filepath.Join(other, "noeku.pem"), filepath.Join(other, "noeku-key.pem")
	if err := srvLike.Write(noEKUCert, noEKUKey); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name     string
		mutate   func(*kms.Config)
		sentinel error
		contains []string
	}{
		{
			name:     "wrong CA",
			mutate:   func(c *kms.Config) { c.CAFile = otherPaths.CACert },
			sentinel: kms.ErrServerCert,
			contains: []string{"tls: server certificate rejected", "unknown authority"},
		},
		{
			name: "client cert from another CA",
			mutate: func(c *kms.Config) {
				c.CertFile, c.KeyFile = otherPaths.ClientCert, otherPaths.ClientKey
			},
			sentinel: kms.ErrClientCertRejected,
			contains: []string{"tls: server rejected our client certificate"},
		},
		{
			name: "client cert without clientAuth",
			mutate: func(c *kms.Config) {
				c.CertFile, c.KeyFile = noEKUCert, noEKUKey
			},
			sentinel: kms.ErrClientCertRejected,
			contains: []string{"tls: server rejected our client certificate"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := l.config("lab")
			tc.mutate(&cfg)
			p := newProvider(t, cfg)
			ctx := testCtx(t)
			_, err := p.CreateKey(ctx, "x")
			if !errors.Is(err, tc.sentinel) {
				t.Fatalf("CreateKey: %v, want %v", err, tc.sentinel)
			}
			checkOneLine(t, err, append([]string{`kms provider "lab": server ` + l.addr}, tc.contains...)...)
			t.Logf("error: %v", err)
			st := p.Status(ctx)[0]
			t.Logf("status: %+v", st)
			if !st.Reachable || st.TLSOK || st.Error == "" {
				t.Fatalf("Status: %+v", st)
			}
			switch tc.sentinel {
			case kms.ErrServerCert:
				if st.ServerCertOK {
					t.Fatalf("Status says server cert OK: %+v", st)
				}
			case kms.ErrClientCertRejected:
				if !st.ServerCertOK || st.ClientCertOK {
					t.Fatalf("Status: %+v", st)
				}
			}
		})
	}
}

func TestConfig(t *testing.T) {
	l := newLab(t)
	good := l.config("lab")
	cases := []struct {
		name    string
		mutate  func(*kms.Config)
		wantErr string
	}{
		{"valid", func(*kms.Config) {}, ""},
		{"no name", func(c *kms.Config) { c.Name = "" }, "name is empty"},
		{"no servers", func(c *kms.Config) { c.Servers = nil }, "no servers"},
		{"bad port", func(c *kms.Config) { c.Servers = []string{"127.0.0.1:99999"} }, "invalid port"},
		{"default port", func(c *kms.Config) { c.Servers = []string{"127.0.0.1"} }, ""},
		{"no CA", func(c *kms.Config) { c.CAFile = "" }, "ca_file is empty"},
		{"missing CA file", func(c *kms.Config) { c.CAFile = "/nonexistent/ca.pem" }, "ca_file"},
		{"no client cert", func(c *kms.Config) { c.CertFile = "" }, "cert_file and key_file are required"},
		{"bad version", func(c *kms.Config) { c.KMIPVersions = []string{"2.0"} }, "kmip_versions"},
		{"bad suite", func(c *kms.Config) { c.TLSCipherSuites = []string{"NOPE"} }, "unknown suite"},
		{"rsa cbc suite", func(c *kms.Config) {
			c.TLSCipherSuites = []string{"TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256"}
		}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.mutate(&cfg)
			p, err := kms.New(cfg, quietLogger())
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				p.Close()
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("New: %v, want error containing %q", err, tc.wantErr)
			}
		})
	}

	// The TOML spelling the daemon's config file uses.
	var file struct {
		KMS []kms.Config `toml:"kms"`
	}
	src := `
[[kms]]
name = "lab"
servers = ["127.0.0.1:5696", "kms2:5697"]
ca_file = "/etc/ca.pem"
cert_file = "/etc/client.pem"
key_file = "/etc/client-key.pem"
timeout = "3s"
connect_timeout = "1500ms"
retries = 4
retry_backoff = "100ms"
pool_size = 8
idle_timeout = "1m"
kmip_versions = ["1.1"]
tls_cipher_suites = ["TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256"]
server_name = "kms.example"
`
	md, err := toml.Decode(src, &file)
	if err != nil {
		t.Fatal(err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		t.Fatalf("undecoded TOML keys: %v", und)
	}
	c := file.KMS[0]
	if c.Name != "lab" || len(c.Servers) != 2 || c.Timeout != 3*time.Second || c.ConnectTimeout != 1500*time.Millisecond ||
		c.Retries != 4 || c.RetryBackoff != 100*time.Millisecond || c.PoolSize != 8 || c.IdleTimeout != time.Minute ||
		c.KMIPVersions[0] != "1.1" || c.ServerName != "kms.example" || c.CAFile != "/etc/ca.pem" || c.KeyFile != "/etc/client-key.pem" {
		t.Fatalf("decoded %+v", c)
	}
}

// TestKMIPVersionPinned: a provider limited to KMIP 1.1 (vCenter's header
// version) negotiates it and works end to end.
func TestKMIPVersionPinned(t *testing.T) {
	for _, v := range []string{"1.0", "1.1", "1.2", "1.3"} {
		t.Run(v, func(t *testing.T) {
			l := newLab(t)
			cfg := l.config("lab")
			cfg.KMIPVersions = []string{v}
			p := newProvider(t, cfg)
			ctx := testCtx(t)
			if st := p.Status(ctx)[0]; st.KMIPVersion != v || st.Error != "" {
				t.Fatalf("Status: %+v", st)
			}
			id, err := p.CreateKey(ctx, "pinned")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := p.GetKey(ctx, id); err != nil {
				t.Fatal(err)
			}
			if ids, err := p.Locate(ctx, "pinned"); err != nil || len(ids) != 1 {
				t.Fatalf("Locate: %v %v", ids, err)
			}
			if err := p.Destroy(ctx, id); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestClosedProvider(t *testing.T) {
	l := newLab(t)
	p := newProvider(t, l.config("lab"))
	p.Close()
	_, err := p.GetKey(testCtx(t), "x")
	if !errors.Is(err, kms.ErrClosed) {
		t.Fatalf("GetKey after Close: %v", err)
	}
	checkOneLine(t, err, `kms provider "lab"`, "provider closed")
}

// TestRetryRidesOutShortOutage: with retries configured, a request made
// while the only server is restarting succeeds once it is back.
func TestRetryRidesOutShortOutage(t *testing.T) {
	l := newLab(t)
	cfg := l.config("lab")
	cfg.Retries = 8
	cfg.RetryBackoff = 100 * time.Millisecond
	p := newProvider(t, cfg)
	ctx := testCtx(t)
	id, err := p.CreateKey(ctx, "retry")
	if err != nil {
		t.Fatal(err)
	}
	l.stop()
	done := make(chan error, 1)
	go func() {
		_, err := p.GetKey(ctx, id)
		done <- err
	}()
	time.Sleep(300 * time.Millisecond)
	l.start()
	if err := <-done; err != nil {
		t.Fatalf("GetKey across a short outage: %v", err)
	}
}

// blackhole accepts TCP connections and never answers: the TLS handshake
// hangs until the client gives up. It counts the connections it got.
func blackhole(t *testing.T) (string, *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		count atomic.Int32
		conns []net.Conn
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			count.Add(1)
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String(), &count
}

func TestTimeoutsAndFailover(t *testing.T) {
	l := newLab(t)
	hole, holeConns := blackhole(t)
	ctx := testCtx(t)

	// Alone, the black hole times out with a one-line error.
	cfg := l.config("lab")
	cfg.Servers = []string{hole}
	cfg.ConnectTimeout = 300 * time.Millisecond
	cfg.Retries = -1
	p := newProvider(t, cfg)
	start := time.Now()
	_, err := p.GetKey(ctx, "x")
	if !errors.Is(err, kms.ErrTimeout) {
		t.Fatalf("GetKey from a black hole: %v, want ErrTimeout", err)
	}
	checkOneLine(t, err, "server "+hole, "timed out")
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("connect timeout took %v", d)
	}

	// First server a black hole, second live: the first request pays one
	// connect timeout, later ones go straight to the live server.
	cfg = l.config("lab")
	cfg.Servers = []string{hole, l.addr}
	cfg.ConnectTimeout = 300 * time.Millisecond
	p = newProvider(t, cfg)
	id, err := p.CreateKey(ctx, "timeouts")
	if err != nil {
		t.Fatal(err)
	}
	before := holeConns.Load()
	for i := 0; i < 3; i++ {
		if _, err := p.GetKey(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if n := holeConns.Load() - before; n != 0 {
		t.Fatalf("the dead first server was tried %d more times after failing", n)
	}
}

// TestTagsAndNoKeyMaterialInLogs: keys made by CreateKey carry the x-*
// tags on a server that supports Add Attribute, and neither the provider's
// nor the lab server's logs (at debug level) nor any error show key bytes.
func TestTagsAndNoKeyMaterialInLogs(t *testing.T) {
	dir := t.TempDir()
	if err := labkms.Init(dir); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&lockedWriter{w: &logs}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := labkms.Listen(dir, "127.0.0.1:0", logger)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	defer func() { srv.Close(); <-done }()

	cfg := labkms.PathsFor(dir).ProviderConfig("lab", srv.Addr())
	p, err := kms.New(cfg, logger)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx := testCtx(t)

	var keys [][]byte
	var errs []error
	for i := 0; i < 3; i++ {
		id, err := p.CreateKey(ctx, fmt.Sprintf("vm-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		k, err := p.GetKey(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, bytes.Clone(k))
		if err := p.Revoke(ctx, id, kms.RevokeKeyCompromise); err != nil {
			t.Fatal(err)
		}
		_, err = p.GetKey(ctx, id)
		errs = append(errs, err)
		if i == 0 {
			checkTags(t, labkms.PathsFor(dir), srv.Addr(), id, "vm-0")
		}
	}
	var text bytes.Buffer
	text.Write(logs.Bytes())
	for _, err := range errs {
		fmt.Fprintln(&text, err)
	}
	for _, k := range keys {
		for _, enc := range [][]byte{k, []byte(hex.EncodeToString(k)), []byte(hex.EncodeToString(k)[:16]), []byte(base64.StdEncoding.EncodeToString(k)[:16])} {
			if bytes.Contains(text.Bytes(), enc) {
				t.Fatal("key material appears in logs or errors")
			}
		}
	}
	if !strings.Contains(logs.String(), "kms key created") || !strings.Contains(logs.String(), "lab kms: key retrieved") {
		t.Fatal("expected log lines missing; is the logger wired?")
	}
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func checkTags(t *testing.T, paths labkms.Paths, addr, id, name string) {
	t.Helper()
	c, err := kmipclient.Dial(addr, kmipclient.WithRootCAFile(paths.CACert), kmipclient.WithClientCertFiles(paths.ClientCert, paths.ClientKey))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	resp, err := c.GetAttributes(id, kms.TagVendor, kms.TagProduct, kms.TagName).ExecContext(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, a := range resp.Attribute {
		v, ok := a.AttributeValue.(ttlv.Value)
		if !ok {
			t.Fatalf("%s: %T", a.AttributeName, a.AttributeValue)
		}
		got[string(a.AttributeName)] = fmt.Sprint(v.Value)
	}
	want := map[string]string{kms.TagVendor: kms.VendorValue, kms.TagProduct: kms.ProductValue, kms.TagName: name}
	if !maps.Equal(got, want) {
		t.Fatalf("tags = %v, want %v", got, want)
	}
}

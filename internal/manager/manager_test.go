package manager

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
	"github.com/vmcryptd/vmcryptd/internal/pki"
	"github.com/vmcryptd/vmcryptd/kms"
	"github.com/vmcryptd/vmcryptd/kms/labkms"
)

// lab is a real lab KMS plus a real manager on 127.0.0.1, in-process.
type lab struct {
	t      *testing.T
	dir    string
	cfg    *Config
	kms    *labkms.Server
	m      *Manager
	cancel context.CancelFunc
	done   chan error
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func startLab(t *testing.T) *lab { return startLabWith(t, nil) }

// startLabWith uses provider as the manager's KMS (nil: a lab KMS).
func startLabWith(t *testing.T, provider *kms.Config) *lab {
	t.Helper()
	dir := t.TempDir()
	mdir := filepath.Join(dir, "manager")
	if err := Init(mdir, nil); err != nil {
		t.Fatal(err)
	}
	var srv *labkms.Server
	if provider == nil {
		srv = startLabKMS(t, filepath.Join(dir, "kms"))
		c := labkms.PathsFor(filepath.Join(dir, "kms")).ProviderConfig("lab", srv.Addr())
		provider = &c
	}
	cfgPath := filepath.Join(mdir, "manager.toml")
	if err := WriteConfig(cfgPath, &Config{
		Listen: "127.0.0.1:0", Socket: filepath.Join(mdir, "manager.sock"), StateDir: filepath.Join(mdir, "state"),
		KMS: []kms.Config{*provider},
	}); err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	l := &lab{t: t, dir: dir, cfg: cfg, kms: srv}
	l.start()
	t.Cleanup(l.stop)
	return l
}

func startLabKMS(t *testing.T, kmsDir string) *labkms.Server {
	t.Helper()
	if err := labkms.Init(kmsDir); err != nil {
		t.Fatal(err)
	}
	srv, err := labkms.Listen(kmsDir, "127.0.0.1:0", quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })
	return srv
}

func (l *lab) start() {
	l.t.Helper()
	m, err := New(Options{Config: l.cfg, Logger: quietLogger(), Version: "test"})
	if err != nil {
		l.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	l.m, l.cancel, l.done = m, cancel, make(chan error, 1)
	go func() { l.done <- m.Run(ctx) }()
	for deadline := time.Now().Add(5 * time.Second); ; {
		var st Status
		if err := l.admin().Do(context.Background(), "GET", "/status", nil, &st); err == nil && st.Listen != "" {
			l.cfg.Listen = st.Listen // a restart listens where the hosts expect it
			return
		}
		if time.Now().After(deadline) {
			l.t.Fatal("manager did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (l *lab) stop() {
	if l.cancel == nil {
		return
	}
	l.cancel()
	if err := <-l.done; err != nil {
		l.t.Errorf("manager Run: %v", err)
	}
	l.m.Close()
	l.cancel = nil
}

func (l *lab) admin() *api.Client { return api.NewClient(l.cfg.Socket) }

// addHost issues a host bundle and returns a client using it.
func (l *lab) addHost(name string) (*mgrproto.Client, mgrproto.Config) {
	l.t.Helper()
	var b HostBundle
	if err := l.admin().Do(context.Background(), "POST", "/hosts", HostAddRequest{Name: name}, &b); err != nil {
		l.t.Fatal(err)
	}
	d := filepath.Join(l.dir, name)
	os.MkdirAll(d, 0o700)
	c := mgrproto.Config{Address: b.ManagerAddress, CAFile: filepath.Join(d, "ca.pem"), CertFile: filepath.Join(d, "host.pem"), KeyFile: filepath.Join(d, "host-key.pem")}
	for p, s := range map[string]string{c.CAFile: b.CAPEM, c.CertFile: b.CertPEM, c.KeyFile: b.KeyPEM} {
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			l.t.Fatal(err)
		}
	}
	cl, err := mgrproto.NewClient(c)
	if err != nil {
		l.t.Fatal(err)
	}
	return cl, c
}

func refusal(t *testing.T, err error, code, want string) {
	t.Helper()
	var re *mgrproto.RefusedError
	if !errors.As(err, &re) || re.Code != code || !strings.Contains(re.Msg, want) || strings.Contains(re.Msg, "\n") {
		t.Fatalf("got %v, want a one-line %s refusal containing %q", err, code, want)
	}
}

func TestHostChannelNeedToKnow(t *testing.T) {
	l := startLab(t)
	ctx := context.Background()
	h1, _ := l.addHost("host1")
	h2, _ := l.addHost("host2")

	hello, err := h1.Hello(ctx, mgrproto.HostStatus{Version: "t"})
	if err != nil || hello.Host != "host1" || hello.DefaultProvider != "lab" {
		t.Fatalf("hello: %+v %v", hello, err)
	}
	k1, err := h1.CreateKey(ctx, "", "vm1-key")
	if err != nil {
		t.Fatal(err)
	}
	raw1, state, err := h1.GetKey(ctx, k1, "")
	if err != nil || len(raw1) != 32 || state != "Active" {
		t.Fatalf("host1 get its new key: %d bytes, state %q, %v", len(raw1), state, err)
	}
	_, _, err = h2.GetKey(ctx, k1, "")
	refusal(t, err, mgrproto.CodeDenied, `belongs to host "host1"`)

	vm1 := mgrproto.VM{ID: "vm-1", Name: "vm1", Dir: "/shared/vm1", Keys: []mgrproto.KeyRef{k1}}
	if err := h1.RegisterVM(ctx, vm1); err != nil {
		t.Fatal(err)
	}
	refusal(t, h2.RegisterVM(ctx, vm1), mgrproto.CodeDenied, `registered to host "host1"`)
	forged := mgrproto.VM{ID: "vm-forged", Keys: []mgrproto.KeyRef{k1}}
	refusal(t, h2.RegisterVM(ctx, forged), mgrproto.CodeDenied, `belongs to host "host1"`)
	_, _, err = h2.GetKey(ctx, k1, "vm-1")
	refusal(t, err, mgrproto.CodeDenied, `registered to host "host1"`)
	refusal(t, h2.UnregisterVM(ctx, "vm-1"), mgrproto.CodeDenied, `registered to host "host1"`)
	_, _, err = h1.GetKey(ctx, mgrproto.KeyRef{Provider: "lab", KeyID: "no-such"}, "")
	refusal(t, err, mgrproto.CodeDenied, "not known to the manager")

	// Same key, twice, after a manager restart: the inventory survives,
	// the key is fetched from the KMS again and is the same.
	l.stop()
	_, _, err = h1.GetKey(ctx, k1, "")
	var ue *mgrproto.UnreachableError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "manager unreachable") {
		t.Fatalf("manager down: %v, want manager unreachable", err)
	}
	l.start()
	raw2, _, err := h1.GetKey(ctx, k1, "vm-1")
	if err != nil || !bytes.Equal(raw1, raw2) {
		t.Fatalf("after restart: %v (same key: %v)", err, bytes.Equal(raw1, raw2))
	}

	// Removing host1 cuts it off at once; its VM is released.
	var rm HostRemoved
	if err := l.admin().Do(ctx, "DELETE", "/hosts/host1", nil, &rm); err != nil {
		t.Fatal(err)
	}
	if len(rm.ReleasedVMs) != 1 || rm.ReleasedVMs[0] != "vm-1" {
		t.Fatalf("released %v", rm.ReleasedVMs)
	}
	_, _, err = h1.GetKey(ctx, k1, "")
	refusal(t, err, mgrproto.CodeRevoked, "revoked")
	// The released VM may now be registered to host2, which then gets its key.
	if err := h2.RegisterVM(ctx, vm1); err != nil {
		t.Fatal(err)
	}
	if raw3, _, err := h2.GetKey(ctx, k1, "vm-1"); err != nil || !bytes.Equal(raw1, raw3) {
		t.Fatalf("host2 after takeover: %v", err)
	}

	audit, err := os.ReadFile(l.cfg.AuditLog)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"host":"host2","op":"host.get_key","key_ids":["` + k1.String() + `"],"privilege":"Cryptographer.Access","result":"denied"`,
		`"host":"host1","op":"host.get_key"`, `"result":"denied","detail":"host certificate`, `"op":"manager.host.remove"`} {
		if !strings.Contains(string(audit), want) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	if bytes.Contains(audit, raw1) {
		t.Error("audit log holds key material")
	}
}

// TestFetchDeduplicated: a storm of concurrent requests for few keys
// costs one KMS fetch per key.
func TestFetchDeduplicated(t *testing.T) {
	l := startLab(t)
	ctx := context.Background()
	h1, _ := l.addHost("host1")
	var refs []mgrproto.KeyRef
	for i := 0; i < 3; i++ {
		k, err := h1.CreateKey(ctx, "lab", "k")
		if err != nil {
			t.Fatal(err)
		}
		refs = append(refs, k)
	}
	l.stop() // empty the cache
	l.start()
	var wg sync.WaitGroup
	errs := make(chan error, 30)
	for i := 0; i < 30; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			raw, _, err := h1.GetKey(ctx, refs[i%3], "")
			clear(raw)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	var st Status
	if err := l.admin().Do(ctx, "GET", "/status", nil, &st); err != nil {
		t.Fatal(err)
	}
	if st.KMSFetches != 3 || st.CachedKeys != 3 || !st.KeysLocked {
		t.Fatalf("30 requests for 3 keys: %d KMS fetches, %d cached (mlocked %v), want 3", st.KMSFetches, st.CachedKeys, st.KeysLocked)
	}
}

// TestHostChannelBadInput sends malformed and oversized frames over a
// real host connection: each gets a one-line bad_request answer, is
// audited, and the manager keeps serving.
func TestHostChannelBadInput(t *testing.T) {
	l := startLab(t)
	h1, c1 := l.addHost("host1")
	cert, err := tls.LoadX509KeyPair(c1.CertFile, c1.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	frame := func(b []byte) []byte {
		out := binary.BigEndian.AppendUint32(nil, uint32(len(b)))
		return append(out, b...)
	}
	cases := []struct {
		name string
		send []byte
		want string
	}{
		{"oversized", binary.BigEndian.AppendUint32(nil, mgrproto.MaxFrame+1), "exceeds the limit"},
		{"empty", frame(nil), "empty frame"},
		{"not json", frame([]byte("{nope")), "malformed frame"},
		{"unknown field", frame([]byte(`{"op":"hello","status":{},"x":1}`)), "unknown field"},
		{"unknown op", frame([]byte(`{"op":"steal_all"}`)), `unknown op "steal_all"`},
		{"missing key id", frame([]byte(`{"op":"get_key","provider":"lab"}`)), "needs provider and key_id"},
		{"trailing", frame([]byte(`{"op":"hello","status":{}} {}`)), "data after"},
		{"policy missing", frame([]byte(`{"op":"get_policy"}`)), "get_policy needs policy"},
		{"policy too long", frame([]byte(`{"op":"get_policy","policy":"` + strings.Repeat("p", mgrproto.MaxField+1) + `"}`)), "longer than"},
		{"policy not a string", frame([]byte(`{"op":"get_policy","policy":7}`)), "malformed frame"},
		{"vm policy too long", frame([]byte(`{"op":"register_vm","vm":{"id":"x","policy":"` + strings.Repeat("p", mgrproto.MaxField+1) + `","keys":[{"provider":"a","key_id":"b"}]}}`)), "longer than"},
		{"too many keys", frame([]byte(`{"op":"register_vm","vm":{"id":"x","keys":[` + strings.Repeat(`{"provider":"a","key_id":"b"},`, 64) + `{"provider":"a","key_id":"b"}]}}`)), "1 to 64 keys"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			conn, err := tls.Dial("tcp", c1.Address, &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true, NextProtos: []string{mgrproto.ALPN}, MinVersion: tls.VersionTLS13})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := conn.Write(c.send); err != nil {
				t.Fatal(err)
			}
			var r mgrproto.Reply
			if err := mgrproto.ReadFrame(conn, &r); err != nil {
				t.Fatal(err)
			}
			if r.OK || r.Code != mgrproto.CodeBadRequest || !strings.Contains(r.Error, c.want) {
				t.Fatalf("reply %+v, want bad_request with %q", r, c.want)
			}
			// The connection is closed after a bad frame.
			if _, err := conn.Read(make([]byte, 1)); err == nil {
				t.Fatal("connection still open after a bad frame")
			}
		})
	}
	// No ALPN: refused.
	conn, err := tls.Dial("tcp", c1.Address, &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	var r mgrproto.Reply
	if err := mgrproto.ReadFrame(conn, &r); err != nil || !strings.Contains(r.Error, "ALPN") {
		t.Fatalf("no ALPN: %+v %v", r, err)
	}
	conn.Close()
	// A certificate from another CA never gets past the handshake.
	otherCA, err := pki.NewCA("another CA")
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := otherCA.IssueClient("host1")
	if err != nil {
		t.Fatal(err)
	}
	sc, err := stranger.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	for name, certs := range map[string][]tls.Certificate{"foreign CA": {sc}, "no certificate": nil} {
		conn, err := tls.Dial("tcp", c1.Address, &tls.Config{Certificates: certs, InsecureSkipVerify: true, NextProtos: []string{mgrproto.ALPN}, MinVersion: tls.VersionTLS13})
		if err == nil {
			// TLS 1.3: the server's refusal of the client certificate
			// arrives on the first read.
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			mgrproto.WriteFrame(conn, mgrproto.Request{Op: "hello", Status: &mgrproto.HostStatus{}})
			var r mgrproto.Reply
			err = mgrproto.ReadFrame(conn, &r)
			conn.Close()
		}
		if err == nil {
			t.Errorf("%s: the manager answered", name)
		}
	}
	if _, err := h1.Hello(context.Background(), mgrproto.HostStatus{}); err != nil {
		t.Fatalf("manager stopped serving after bad input: %v", err)
	}
	audit, _ := os.ReadFile(l.cfg.AuditLog)
	if n := strings.Count(string(audit), `"result":"denied","detail":"bad request`); n != len(cases) {
		t.Errorf("audit has %d bad-request denials, want %d", n, len(cases))
	}
}

// TestKMSDownCachedKeysServed: with the KMS gone the manager keeps
// handing out keys it holds; a key it does not hold and a new key are
// refused as unavailable, one line each, audited as errors.
func TestKMSDownCachedKeysServed(t *testing.T) {
	l := startLab(t)
	ctx := context.Background()
	h1, _ := l.addHost("host1")
	k1, err := h1.CreateKey(ctx, "", "cached")
	if err != nil {
		t.Fatal(err)
	}
	k2, err := h1.CreateKey(ctx, "", "not-cached")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := h1.GetKey(ctx, k1, ""); err != nil {
		t.Fatal(err)
	}
	l.kms.Close()
	if raw, _, err := h1.GetKey(ctx, k1, ""); err != nil || len(raw) != 32 {
		t.Fatalf("cached key with the KMS down: %v", err)
	}
	_, _, err = h1.GetKey(ctx, k2, "")
	refusal(t, err, mgrproto.CodeUnavailable, "fetch key "+k2.String()+" from the KMS")
	_, err = h1.CreateKey(ctx, "", "new")
	refusal(t, err, mgrproto.CodeUnavailable, `create key on provider "lab"`)
	audit, _ := os.ReadFile(l.cfg.AuditLog)
	if !strings.Contains(string(audit), `"key_ids":["`+k2.String()+`"],"privilege":"Cryptographer.Access","result":"error"`) {
		t.Error("the unavailable key is not audited as an error")
	}
}

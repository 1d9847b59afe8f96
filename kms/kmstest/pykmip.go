// Package kmstest runs real KMIP peers for the tests of vmcryptd's
// packages. It is test support only: nothing outside _test.go files should
// import it.
package kmstest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/pki"
	"github.com/vmcryptd/vmcryptd/kms"
)

// ClientCN is the common name of the client certificate StartPyKMIP
// issues. PyKMIP's default policy lets a client see only the objects owned
// by its certificate's CN, so every client built from CertFile/KeyFile
// (a daemon, a test's own kms.Provider) sees the same keys.
const ClientCN = "vmcryptd"

// startTimeout bounds one start of pykmip-server. Generous: on a busy
// 2-core machine PyKMIP has been seen to take 17 s.
const startTimeout = 90 * time.Second

// NeedPeer fails the test when CI=true and skips it otherwise: a missing
// real peer must never let CI pass without testing interoperability.
func NeedPeer(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s (CI=true: a missing peer is a failure; apt-get install -y python3-pykmip)", msg)
	}
	t.Skipf("%s; skipping (apt-get install -y python3-pykmip to run it)", msg)
}

// PyKMIPServerPath returns the pykmip-server executable, or calls NeedPeer.
func PyKMIPServerPath(t testing.TB) string {
	t.Helper()
	path, err := exec.LookPath("pykmip-server")
	if err == nil {
		return path
	}
	if _, serr := os.Stat("/usr/bin/pykmip-server"); serr == nil {
		return "/usr/bin/pykmip-server"
	}
	NeedPeer(t, "pykmip-server not found")
	return ""
}

// PyKMIP is a pykmip-server child process with its own ECDSA P-256 PKI,
// configuration and SQLite database in a temp directory. Its keys survive
// Stop and Start (same database, same port), which is how tests simulate a
// key-server outage and its recovery.
type PyKMIP struct {
	// Addr is "127.0.0.1:port"; it does not change across Stop and Start.
	Addr string
	// Dir holds everything below, server.conf and the database.
	Dir string
	// CAFile signs the server and client certificates; CAKeyFile is its
	// key, for tests that issue more certificates.
	CAFile, CAKeyFile string
	// CertFile and KeyFile are the client certificate (CN ClientCN, EKU
	// clientAuth) and its key.
	CertFile, KeyFile string
	// LogFile is the server's log (INFO level: at DEBUG PyKMIP logs whole
	// response encodings, key material included). Its tail is shown when
	// the test fails.
	LogFile string

	t    testing.TB
	bin  string
	conf string

	mu   sync.Mutex
	proc *pykmipProc // nil while stopped
}

type pykmipProc struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once Wait returned
	err    error         // Wait's result, valid after exited is closed
	out    *bytes.Buffer // stdout+stderr, valid after exited is closed
}

// StartPyKMIP writes a PKI and a server.conf (auth_suite TLS1.2, client
// certificates required) into a temp dir, starts pykmip-server on a free
// loopback port and waits until it accepts connections. Without
// pykmip-server the test is skipped, or failed when CI=true.
//
// The server (its whole process group: PyKMIP forks a policy monitor) is
// killed in t.Cleanup whatever the test outcome.
func StartPyKMIP(t testing.TB) *PyKMIP { return StartPyKMIPWith(t, Options{}) }

// Options changes how StartPyKMIPWith sets the server up.
type Options struct {
	// RSA gives the CA and the server RSA-2048 keys instead of ECDSA
	// P-256, as many commercial KMS deployments have. PyKMIP's TLS 1.2
	// suite list then leaves only CBC-SHA256 and RSA key exchange suites,
	// none of which Go's client offers by default (tls_cipher_suites).
	RSA bool
}

// StartPyKMIPWith is StartPyKMIP with options.
func StartPyKMIPWith(t testing.TB, opts Options) *PyKMIP {
	t.Helper()
	bin := PyKMIPServerPath(t)
	dir := t.TempDir()
	j := func(n string) string { return filepath.Join(dir, n) }

	kt := pki.ECDSAP256
	if opts.RSA {
		kt = pki.RSA2048
	}
	ca, err := pki.NewCAWith("pykmip test CA", kt)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.IssueServerWith("pykmip test server", []string{"127.0.0.1", "localhost"}, kt)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := ca.IssueClient(ClientCN)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		p         *pki.Pair
		cert, key string
	}{
		{p: ca, cert: j("ca.pem"), key: j("ca-key.pem")},
		{p: srv, cert: j("server.pem"), key: j("server-key.pem")},
		{p: cli, cert: j("client.pem"), key: j("client-key.pem")},
	} {
		if err := w.p.Write(w.cert, w.key); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(j("policies"), 0o700); err != nil {
		t.Fatal(err)
	}

	p := &PyKMIP{
		Dir: dir, CAFile: j("ca.pem"), CAKeyFile: j("ca-key.pem"),
		CertFile: j("client.pem"), KeyFile: j("client-key.pem"), LogFile: j("server.log"),
		t: t, bin: bin, conf: j("server.conf"),
	}
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			log, _ := os.ReadFile(p.LogFile)
			t.Logf("pykmip-server log tail (%s):\n%s", p.LogFile, tail(log, 4000))
		}
	})

	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		conf := fmt.Sprintf(`[server]
hostname=127.0.0.1
port=%d
certificate_path=%s
key_path=%s
ca_path=%s
auth_suite=TLS1.2
enable_tls_client_auth=True
policy_path=%s
database_path=%s
logging_level=INFO
`, port, j("server.pem"), j("server-key.pem"), j("ca.pem"), j("policies"), j("pykmip.db"))
		if err := os.WriteFile(p.conf, []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
		p.Addr = fmt.Sprintf("127.0.0.1:%d", port)
		start := time.Now()
		if lastErr = p.start(); lastErr == nil {
			t.Logf("pykmip-server on %s up in %v", p.Addr, time.Since(start).Round(time.Millisecond))
			return p
		}
		t.Logf("pykmip-server attempt %d: %v", attempt+1, lastErr)
	}
	t.Fatalf("pykmip-server did not start: %v", lastErr) // Cleanup shows the log
	return nil
}

// Config returns a provider configuration for this server under name,
// with the client certificate and timeouts generous enough for a busy
// machine.
func (p *PyKMIP) Config(name string) kms.Config {
	return kms.Config{
		Name:           name,
		Servers:        []string{p.Addr},
		CAFile:         p.CAFile,
		CertFile:       p.CertFile,
		KeyFile:        p.KeyFile,
		Timeout:        15 * time.Second,
		ConnectTimeout: 10 * time.Second,
		RetryBackoff:   50 * time.Millisecond,
	}
}

// Running reports whether the server process is up (started and not
// stopped, and not exited on its own).
func (p *PyKMIP) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return false
	}
	select {
	case <-p.proc.exited:
		return false
	default:
		return true
	}
}

// Stop kills the server and its process group and waits for it; the port
// is closed when Stop returns. It is idempotent and safe to call from any
// goroutine.
func (p *PyKMIP) Stop() {
	p.mu.Lock()
	pr := p.proc
	p.proc = nil
	p.mu.Unlock()
	if pr != nil {
		pr.kill()
	}
}

// Start starts a stopped server again on the same address, with the same
// database (keys created before Stop are there again), and waits until it
// accepts connections. It does nothing when the server is running. It
// returns an error rather than failing the test so that any test or
// subtest may call it; the server log's tail is shown if the test that
// called StartPyKMIP fails.
func (p *PyKMIP) Start() error {
	if p.Running() {
		return nil
	}
	p.Stop() // reap a server that exited on its own
	start := time.Now()
	var err error
	// The port was ours a moment ago; it can only be busy briefly (a slow
	// exit, a connection whose source port the kernel picked), so retry a
	// server that exits at once.
	for attempt := 0; attempt < 10; attempt++ {
		if err = p.start(); err == nil {
			p.t.Logf("pykmip-server restarted on %s in %v", p.Addr, time.Since(start).Round(time.Millisecond))
			return nil
		}
		if !errors.Is(err, errExitedEarly) {
			break
		}
		time.Sleep(300 * time.Millisecond)
	}
	return fmt.Errorf("pykmip-server did not restart on %s: %w", p.Addr, err)
}

var errExitedEarly = errors.New("exited early")

// start runs pykmip-server with p.conf and waits until p.Addr accepts
// connections; on failure nothing of the process is left.
func (p *PyKMIP) start() error {
	cmd := exec.Command(p.bin, "-f", p.conf, "-l", p.LogFile)
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group, so the policy monitor it forks is killed
		// with it.
		Setpgid: true,
		// If the test binary dies without running Cleanup, the kernel
		// kills the server too.
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	pr := &pykmipProc{cmd: cmd, exited: make(chan struct{}), out: out}
	go func() {
		pr.err = cmd.Wait()
		close(pr.exited)
	}()

	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		select {
		case <-pr.exited:
			pr.kill()
			return fmt.Errorf("%w: %v; output: %s", errExitedEarly, pr.err, strings.TrimSpace(out.String()))
		default:
		}
		c, err := net.DialTimeout("tcp", p.Addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			p.mu.Lock()
			p.proc = pr
			p.mu.Unlock()
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	pr.kill()
	return fmt.Errorf("port %s not open after %v; output: %s", p.Addr, startTimeout, strings.TrimSpace(out.String()))
}

// kill ends the process group: SIGTERM, then SIGKILL after a second.
func (pr *pykmipProc) kill() {
	pgid := pr.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-pr.exited:
	case <-time.After(time.Second):
		// PyKMIP only notices SIGTERM between accept() timeouts; its
		// state is a throw-away temp database (SQLite survives a kill),
		// so do not wait.
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-pr.exited
	}
	// The policy monitor is a multiprocessing child in the same group;
	// make sure nothing of the group survives.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

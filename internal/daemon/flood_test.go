package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/config"
)

// floodEnv makes the test binary a connection flooder instead of running
// the tests (see TestMain): it is started as an unprivileged uid.
const floodEnv = "VMCRYPTD_TEST_FLOOD"

// probeEnv makes it time one status request on the socket it names and
// print the time taken, or the error.
const probeEnv = "VMCRYPTD_TEST_PROBE"

func TestMain(m *testing.M) {
	if spec := os.Getenv(floodEnv); spec != "" {
		os.Exit(flood(spec))
	}
	if sock := os.Getenv(probeEnv); sock != "" {
		took, err := timedStatus(sock, 30*time.Second)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Println(took.Nanoseconds())
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// probeAs times one status request made by a process running as cred.
func probeAs(t *testing.T, exe string, cred *syscall.Credential, sock string) time.Duration {
	t.Helper()
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), probeEnv+"="+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("status as uid %d: %v %s", cred.Uid, err, out)
	}
	ns, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		t.Fatalf("probe: %q", out)
	}
	return time.Duration(ns)
}

// flood opens the connections spec asks for ("sock idle slow keepalive")
// and holds them until stdin closes. It prints "ready" once every dial was
// tried, then a summary of how the daemon treated them.
func flood(spec string) int {
	f := strings.Fields(spec)
	if len(f) != 4 {
		fmt.Fprintln(os.Stderr, "flood: bad spec", spec)
		return 2
	}
	sock := f[0]
	idle, _ := strconv.Atoi(f[1])
	slow, _ := strconv.Atoi(f[2])
	keep, _ := strconv.Atoi(f[3])
	var conns []net.Conn
	dial := func() net.Conn {
		c, err := net.DialTimeout("unix", sock, 2*time.Second)
		if err != nil {
			return nil
		}
		conns = append(conns, c)
		return c
	}
	// Keep-alive clients: one complete request each, answer read, then
	// silence on a connection left open.
	codes := map[int]int{}
	closed := 0
	for i := 0; i < keep; i++ {
		c := dial()
		if c == nil {
			continue
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, "GET "+api.Prefix+"/status HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			continue
		}
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			continue
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		codes[resp.StatusCode]++
		// Did the daemon close the connection after its answer?
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := br.ReadByte(); err == io.EOF {
			closed++
		}
		c.SetDeadline(time.Time{})
	}
	var slowConns []net.Conn
	for i := 0; i < slow; i++ {
		if c := dial(); c != nil {
			c.SetWriteDeadline(time.Now().Add(time.Second))
			io.WriteString(c, "GET "+api.Prefix+"/status HTTP/1.1\r\nHost: x\r\n")
			slowConns = append(slowConns, c)
		}
	}
	for i := 0; i < idle; i++ {
		dial()
	}
	rep, _ := json.Marshal(floodReport{Dialled: len(conns), Answers: codes, Closed: closed})
	fmt.Printf("ready %s\n", rep)
	// Slowloris: one more header line every second, never the blank line.
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				for _, c := range slowConns {
					c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
					io.WriteString(c, "X-Slow: 1\r\n")
				}
			}
		}
	}()
	io.Copy(io.Discard, os.Stdin)
	close(stop)
	for _, c := range conns {
		c.Close()
	}
	return 0
}

// floodReport is what the flooder saw: connections it got, the status
// codes its keep-alive requests were answered with, and how many of those
// connections the daemon closed after answering.
type floodReport struct {
	Dialled int
	Answers map[int]int
	Closed  int
}

// needRoot makes a test that needs root (other uids, mounts) skip, or
// fail under CI=true.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root")
		}
		t.Skip("needs root")
	}
}

// startFlood runs the flooder as cred against sock and waits until it has
// dialled everything; it is stopped (stdin closed, then killed) at cleanup.
func startFlood(t *testing.T, exe string, cred *syscall.Credential, sock string, idle, slow, keep int) floodReport {
	t.Helper()
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), floodEnv+"="+fmt.Sprintf("%s %d %d %d", sock, idle, slow, keep))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		var rep floodReport
		if !strings.HasPrefix(s, "ready ") || json.Unmarshal([]byte(s[len("ready "):]), &rep) != nil {
			t.Fatalf("flooder: %q", s)
		}
		return rep
	case <-time.After(60 * time.Second):
		t.Fatal("flooder did not get its connections out within 60 s")
	}
	return floodReport{}
}

// copyExe copies the test binary where another uid can run it.
func copyExe(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	dir := sharedTempDir(t)
	dst := filepath.Join(dir, "daemon.test")
	if err := os.WriteFile(dst, raw, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// sharedTempDir is a temporary directory other uids may enter (t.TempDir's
// parent is private to root).
func sharedTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmcryptd-daemon-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// startTestDaemon runs a daemon whose socket the socket-group gid may use,
// with the given role bindings, and stops it at cleanup.
func startTestDaemon(t *testing.T, gid int, roles []config.RoleBinding) *config.Config {
	t.Helper()
	dir := sharedTempDir(t)
	cfg := &config.Config{
		Socket: filepath.Join(dir, "run", "d.sock"), SocketGroup: strconv.Itoa(gid),
		StateDir: filepath.Join(dir, "state"), AuditLog: filepath.Join(dir, "audit.log"), Roles: roles,
	}
	d, err := New(Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("daemon: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("daemon did not stop within 20 s")
		}
	})
	c := api.NewClient(cfg.Socket)
	for deadline := time.Now().Add(10 * time.Second); ; {
		if err = c.Do(ctx, "GET", "/status", nil, &api.Status{}); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return cfg
}

// timedStatus is how long one status request as this process's uid takes
// (capped at limit).
func timedStatus(sock string, limit time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	start := time.Now()
	err := api.NewClient(sock).Do(ctx, "GET", "/status", nil, &api.Status{})
	return time.Since(start), err
}

// An unprivileged socket user holding 500 idle, 200 slowloris and 64
// keep-alive connections, plus a socket-group member with no role holding
// 64 keep-alive connections, cannot keep root from the daemon: root's
// status answers in under a second, every time.
func TestConnectionFlood(t *testing.T) {
	needRoot(t)
	// The flooder is a ReadOnly user (or one without a role); an
	// Administrator and another ReadOnly user must get through as well.
	const reader, norole, admin, otherReader = 65534, 65533, 65532, 65531
	ro, ad, ro2 := reader, admin, otherReader
	cfg := startTestDaemon(t, 65534, []config.RoleBinding{{UID: &ro, Role: RoleReadOnly}, {UID: &ad, Role: RoleAdministrator}, {UID: &ro2, Role: RoleReadOnly}})
	exe := copyExe(t)
	limit := 60 * time.Second
	if s := os.Getenv("VMCRYPTD_FLOOD_LIMIT"); s != "" {
		limit, _ = time.ParseDuration(s)
	}
	cases := []struct {
		name             string
		uid              uint32
		idle, slow, keep int
	}{
		{"keepalive-64-norole", norole, 0, 0, 64},
		{"keepalive-64", reader, 0, 0, 64},
		{"slowloris-200", reader, 0, 200, 0},
		{"idle-500", reader, 500, 0, 0},
		{"all", reader, 500, 200, 64},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := startFlood(t, exe, &syscall.Credential{Uid: tc.uid, Gid: 65534}, cfg.Socket, tc.idle, tc.slow, tc.keep)
			t.Logf("flooder: %+v", got)
			if tc.keep > 0 {
				ok, denied, refused := got.Answers[http.StatusOK], got.Answers[http.StatusForbidden], got.Answers[http.StatusServiceUnavailable]
				if ok+denied+refused != tc.keep {
					t.Errorf("keep-alive requests were not all answered: %v", got.Answers)
				}
				if tc.uid == norole && (ok != 0 || denied == 0 || got.Closed != tc.keep) {
					t.Errorf("a caller without a role: answers %v, %d of %d connections closed after the answer", got.Answers, got.Closed, tc.keep)
				}
				if tc.uid != norole && (ok == 0 || ok > defaultLimits.PerPeer) {
					t.Errorf("a ReadOnly caller got %d answers past the per-peer limit %d", ok, defaultLimits.PerPeer)
				}
			}
			for i := 0; i < 3; i++ {
				took, err := timedStatus(cfg.Socket, limit)
				t.Logf("%s: root's status took %v (err %v)", tc.name, took.Round(time.Millisecond), err)
				if err != nil || took > time.Second {
					t.Fatalf("root's status under a %s flood: %v after %v", tc.name, err, took)
				}
			}
			for _, uid := range []uint32{admin, otherReader} {
				took := probeAs(t, exe, &syscall.Credential{Uid: uid, Gid: 65534}, cfg.Socket)
				t.Logf("%s: uid %d's status took %v", tc.name, uid, took.Round(time.Millisecond))
				if took > time.Second {
					t.Fatalf("uid %d's status under a %s flood took %v", uid, tc.name, took)
				}
			}
		})
	}
}

// A client that connects and sends nothing loses its connection after the
// header timeout, not after minutes.
func TestSilentClientDropped(t *testing.T) {
	needRoot(t)
	cfg := startTestDaemon(t, 0, nil)
	c, err := net.Dial("unix", cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("a silent client kept its connection for 30 s")
	}
	if took := time.Since(start); took > 8*time.Second {
		t.Fatalf("a silent client kept its connection for %v", took)
	}
}

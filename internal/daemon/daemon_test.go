package daemon

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/config"
)

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// The daemon serves its API and Prometheus metrics, and shuts down
// cleanly (socket removed) when its context ends.
func TestRunMetricsShutdown(t *testing.T) {
	dir := t.TempDir()
	cfg := &config.Config{
		Socket: filepath.Join(dir, "run", "d.sock"), StateDir: filepath.Join(dir, "state"),
		AuditLog: filepath.Join(dir, "audit.log"), MetricsListen: freeAddr(t),
	}
	d, err := New(Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	c := api.NewClient(cfg.Socket)
	var st api.Status
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err = c.Do(ctx, "GET", "/status", nil, &st); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 && st.Caller.Role != RoleAdministrator {
		t.Fatalf("root resolved to role %q", st.Caller.Role)
	}
	if fi, err := os.Stat(cfg.Socket); err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode: %v %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Dir(cfg.Socket)); err != nil || fi.Mode().Perm() != 0o750 {
		t.Fatalf("socket dir mode: %v %v", fi.Mode(), err)
	}
	resp, err := http.Get("http://" + cfg.MetricsListen + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`vmcryptd_api_requests_total{op="status",result="ok"} 1`, "vmcryptd_keys_cached 0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("daemon did not stop")
	}
	if _, err := os.Stat(cfg.Socket); !os.IsNotExist(err) {
		t.Fatal("socket left behind")
	}
}

func TestAuthorizer(t *testing.T) {
	uid := 1001
	a, err := newAuthorizer([]config.RoleBinding{{UID: &uid, Role: RoleReadOnly}, {Group: "ops", Role: RoleNoCryptoAdmin}, {User: "alice", Role: RoleAdministrator}})
	if err != nil {
		t.Fatal(err)
	}
	a.lookup = func(uid int) (string, []string, error) {
		switch uid {
		case 1002:
			return "bob", []string{"ops"}, nil
		case 1003:
			return "alice", nil, nil
		}
		return "", nil, os.ErrNotExist
	}
	tests := []struct {
		uid  int
		role string
		priv Privilege
		ok   bool
	}{
		{0, RoleAdministrator, PrivEncrypt, true},
		{1001, RoleReadOnly, PrivRead, true},
		{1001, RoleReadOnly, PrivVMConfig, false},
		{1002, RoleNoCryptoAdmin, PrivVMConfig, true},
		{1002, RoleNoCryptoAdmin, PrivAccess, false},
		{1002, RoleNoCryptoAdmin, PrivDecrypt, false},
		{1003, RoleAdministrator, PrivManageKeyServers, true},
		{4242, "", PrivRead, false},
	}
	for _, tt := range tests {
		id := a.resolve(tt.uid)
		if id.Role != tt.role || a.allowed(id, tt.priv) != tt.ok {
			t.Errorf("uid %d: role %q allowed(%s)=%v; want %q %v", tt.uid, id.Role, tt.priv, a.allowed(id, tt.priv), tt.role, tt.ok)
		}
	}
	if _, err := newAuthorizer([]config.RoleBinding{{User: "x", Role: "Nope"}}); err == nil {
		t.Fatal("unknown role accepted")
	}
}

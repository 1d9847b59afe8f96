package daemon

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/config"
)

// listenNotify plays systemd's side of sd_notify on addr.
func listenNotify(t *testing.T, addr string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func readNotify(t *testing.T, c *net.UnixConn, timeout time.Duration) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no sd_notify message: %v", err)
	}
	return string(buf[:n])
}

func TestSdNotify(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		env     string // NOTIFY_SOCKET
		listen  bool
		wantErr bool
	}{
		{"unset: nothing to do", "", false, false},
		{"path socket", filepath.Join(dir, "notify"), true, false},
		{"abstract socket", "@vmcryptd-test-notify-" + filepath.Base(dir), true, false},
		{"nobody listening", filepath.Join(dir, "absent"), false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("NOTIFY_SOCKET", tt.env)
			var c *net.UnixConn
			if tt.listen {
				c = listenNotify(t, tt.env)
			}
			err := sdNotify("READY=1")
			if (err != nil) != tt.wantErr {
				t.Fatalf("sdNotify: err %v, want error %v", err, tt.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), tt.env) {
				t.Errorf("error does not name the socket: %v", err)
			}
			if c != nil {
				if got := readNotify(t, c, 5*time.Second); got != "READY=1" {
					t.Fatalf("got %q", got)
				}
			}
		})
	}
}

// The daemon says READY=1 only once the API answers and a configured
// mount is in place.
func TestRunNotifiesReadyAfterMounts(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root for a FUSE mount")
		}
		t.Skip("needs root for a FUSE mount")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("/dev/fuse missing")
		}
		t.Skip("/dev/fuse missing")
	}
	dir := t.TempDir()
	ds := filepath.Join(dir, "ds")
	if err := os.MkdirAll(filepath.Join(ds, "vm1"), 0o755); err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(dir, "view")
	cfg := &config.Config{
		Socket: filepath.Join(dir, "run", "d.sock"), StateDir: filepath.Join(dir, "state"),
		AuditLog:   filepath.Join(dir, "audit.log"),
		Datastores: []config.Datastore{{Name: "ds", Path: ds}},
		Mounts:     []config.Mount{{Datastore: "ds", Mountpoint: mp}},
	}
	ns := filepath.Join(dir, "notify")
	c := listenNotify(t, ns)
	t.Setenv("NOTIFY_SOCKET", ns)
	d, err := New(Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Error(err)
			}
		case <-time.After(15 * time.Second):
			t.Error("daemon did not stop")
		}
	}()
	msg := readNotify(t, c, 30*time.Second)
	if !strings.HasPrefix(msg, "READY=1\n") || !strings.Contains(msg, "STATUS=serving "+cfg.Socket) {
		t.Fatalf("notify message %q", msg)
	}
	// At READY the view is mounted and the API answers.
	if ents, err := os.ReadDir(mp); err != nil || len(ents) != 1 || ents[0].Name() != "vm1" {
		t.Fatalf("view at READY: %v %v", ents, err)
	}
	var st api.Status
	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	defer scancel()
	if err := api.NewClient(cfg.Socket).Do(sctx, "GET", "/status", nil, &st); err != nil {
		t.Fatalf("API at READY: %v", err)
	}
	if len(st.Mounts) != 1 || st.Mounts[0].Mountpoint != mp {
		t.Fatalf("mounts at READY: %+v", st.Mounts)
	}
}

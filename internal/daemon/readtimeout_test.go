package daemon

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/config"
)

// A client that trickles its request body loses the connection after
// the read timeout, while an operation that runs longer than the
// timeout, after its body was read, is not cancelled.
func TestRequestReadTimeout(t *testing.T) {
	dir := t.TempDir()
	cfg := &config.Config{Socket: filepath.Join(dir, "d.sock"), StateDir: filepath.Join(dir, "state"), AuditLog: filepath.Join(dir, "audit.log")}
	d, err := New(Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	cancelled := make(chan bool, 1)
	mux := http.NewServeMux()
	mux.Handle("POST /slow", d.op("slow", PrivRead, false, func(rc *reqCtx) (any, error) {
		time.Sleep(600 * time.Millisecond)
		cancelled <- rc.r.Context().Err() != nil
		return map[string]string{}, nil
	}))
	srv := &http.Server{Handler: mux, ReadTimeout: 200 * time.Millisecond, ConnContext: peerContext}
	go srv.Serve(ln)
	defer srv.Close()

	// Trickled body: the server gives up on it.
	c, err := net.Dial("unix", cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err == nil && !strings.Contains(string(buf[:n]), "400") {
		t.Fatalf("trickling client got %q", buf[:n])
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the server held a trickling client's connection")
	}
	if time.Since(start) > 3*time.Second {
		t.Fatal("the trickling client was not cut off promptly")
	}

	// A long operation after a complete body runs to its end.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return net.Dial("unix", cfg.Socket)
	}}}
	resp, err := hc.Post("http://x/slow", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("slow operation: %s", resp.Status)
	}
	if <-cancelled {
		t.Fatal("the read timeout cancelled a running operation")
	}
}

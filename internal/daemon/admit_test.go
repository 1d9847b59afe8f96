package daemon

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestAdmit(t *testing.T) {
	l := admitLimits{PerPeer: 3, PerPeerNoRole: 1, Unprivileged: 5, Admin: 4, Root: 2, PerPeerRequests: 2}
	cases := []struct {
		name  string
		kind  admitKind
		class peerClass
		load  admitLoad
		want  string // substring of the refusal; "" admits
	}{
		{"role under quota", admitConn, peerRole, admitLoad{2, 4}, ""},
		{"role at its own quota", admitConn, peerRole, admitLoad{3, 3}, "too many connections from this user (limit 3)"},
		{"role, pool full", admitConn, peerRole, admitLoad{0, 5}, "unprivileged users (limit 5)"},
		{"no role first connection", admitConn, peerNoRole, admitLoad{0, 0}, ""},
		{"no role second connection", admitConn, peerNoRole, admitLoad{1, 1}, "limit 1"},
		{"no role, pool full", admitConn, peerNoRole, admitLoad{0, 5}, "unprivileged users"},
		{"admin, unprivileged pool irrelevant", admitConn, peerAdmin, admitLoad{0, 0}, ""},
		{"admin at its own quota", admitConn, peerAdmin, admitLoad{3, 3}, "from this user (limit 3)"},
		{"admin pool full", admitConn, peerAdmin, admitLoad{1, 4}, "Administrator connections (limit 4)"},
		{"root has no per-peer quota", admitConn, peerRoot, admitLoad{100, 1}, ""},
		{"root reserve full", admitConn, peerRoot, admitLoad{2, 2}, "from root (limit 2)"},
		{"request under quota", admitRequest, peerRole, admitLoad{1, 0}, ""},
		{"request at quota", admitRequest, peerRole, admitLoad{2, 0}, "too many requests in progress for this user (limit 2)"},
		{"admin request at quota", admitRequest, peerAdmin, admitLoad{2, 0}, "too many requests"},
		{"root requests unlimited", admitRequest, peerRoot, admitLoad{1000, 0}, ""},
		{"unknown class refused", admitConn, peerClass(9), admitLoad{}, "unknown"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := admit(tc.kind, tc.class, tc.load, l)
			if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
				t.Fatalf("admit = %q, want %q", got, tc.want)
			}
			if strings.Contains(got, "\n") {
				t.Fatalf("refusal is not one line: %q", got)
			}
		})
	}
}

func TestClassOf(t *testing.T) {
	cases := []struct {
		id   identity
		want peerClass
	}{
		{identity{UID: 0, Role: RoleAdministrator}, peerRoot},
		{identity{UID: 1000, Role: RoleAdministrator}, peerAdmin},
		{identity{UID: 1000, Role: RoleNoCryptoAdmin}, peerRole},
		{identity{UID: 1000, Role: RoleReadOnly}, peerRole},
		{identity{UID: 1000}, peerNoRole},
	}
	for _, tc := range cases {
		if got := classOf(tc.id); got != tc.want {
			t.Errorf("classOf(%+v) = %v, want %v", tc.id, got, tc.want)
		}
	}
}

// The admission listener hands over connections within the quota, answers
// the others with a 503 naming the limit, and frees a slot on Close; a
// second class keeps its own reserve while the first is full.
func TestAdmitListener(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	inner, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var class atomic.Int32
	class.Store(int32(peerRole))
	classify := func(int) peerClass { return peerClass(class.Load()) }
	track := newConnTracker(admitLimits{PerPeer: 2, PerPeerNoRole: 1, Unprivileged: 2, Admin: 1, Root: 1, PerPeerRequests: 1})
	ln := newAdmitListener(inner, track, func(uid int) peerClass { return classify(uid) }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	accepted := make(chan net.Conn, 8)
	go func() {
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	defer ln.Close()
	dial := func() net.Conn {
		t.Helper()
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	next := func() net.Conn {
		t.Helper()
		select {
		case c := <-accepted:
			return c
		case <-time.After(5 * time.Second):
			t.Fatal("no connection accepted")
		}
		return nil
	}
	a, b := dial(), dial()
	ca, _ := next(), next()
	// The third is answered at once, not queued.
	c := dial()
	io.WriteString(c, "GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("refused connection got no answer: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "too many connections from this user (limit 2)") {
		t.Fatalf("refusal: %s %s", resp.Status, body)
	}
	select {
	case x := <-accepted:
		t.Fatalf("a connection past the quota was handed on: %v", x)
	default:
	}
	// Root's reserve is untouched by the full unprivileged pool.
	class.Store(int32(peerRoot))
	dial()
	r := next().(*admittedConn)
	if r.class != peerRoot {
		t.Fatalf("class %v", r.class)
	}
	// Closing frees the slot (the test runs as one uid: the per-peer
	// count includes the "root" connection too).
	r.Close()
	class.Store(int32(peerRole))
	ca.Close()
	dial()
	if x := next().(*admittedConn); x.class != peerRole {
		t.Fatalf("class %v", x.class)
	}
	_, _ = a, b
}

// admitRequests refuses a request past the per-peer limit with 429 and
// closes the connection of a caller without a role after its answer.
func TestAdmitRequests(t *testing.T) {
	track := newConnTracker(admitLimits{PerPeerRequests: 1})
	release := make(chan struct{})
	entered := make(chan struct{}, 4)
	h := admitRequests(track, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		if r.URL.Path == "/block" {
			<-release
		}
		w.WriteHeader(http.StatusOK)
	}))
	req := func(path string, uid int, class peerClass) *http.Request {
		r, _ := http.NewRequest("GET", path, nil)
		ctx := context.WithValue(r.Context(), peerKey{}, uid)
		return r.WithContext(context.WithValue(ctx, peerClassKey{}, class))
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.ServeHTTP(httptest.NewRecorder(), req("/block", 1000, peerRole))
	}()
	<-entered
	cases := []struct {
		name      string
		uid       int
		class     peerClass
		code      int
		closeConn bool
	}{
		{"same uid past its limit", 1000, peerRole, http.StatusTooManyRequests, true},
		{"another uid", 1001, peerRole, http.StatusOK, false},
		{"root is not limited", 0, peerRoot, http.StatusOK, false},
		{"no role: answered, then closed", 1002, peerNoRole, http.StatusOK, true},
	}
	for _, tc := range cases {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req("/x", tc.uid, tc.class))
		if w.Code != tc.code || (w.Header().Get("Connection") == "close") != tc.closeConn {
			t.Errorf("%s: %d, Connection %q", tc.name, w.Code, w.Header().Get("Connection"))
		}
		if tc.code == http.StatusTooManyRequests && !strings.Contains(w.Body.String(), "too many requests in progress") {
			t.Errorf("%s: body %s", tc.name, w.Body)
		}
	}
	close(release)
	<-done
	// The slot is free again.
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req("/x", 1000, peerRole))
	if w.Code != http.StatusOK {
		t.Fatalf("after release: %d", w.Code)
	}
}

// A caller whose role lookup hangs (a slow user directory) holds up no
// one else's connection.
func TestAdmitListenerSlowLookup(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	inner, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	block := make(chan struct{})
	var calls atomic.Int32
	classify := func(int) peerClass {
		if calls.Add(1) == 1 {
			<-block
		}
		return peerRoot
	}
	ln := newAdmitListener(inner, newConnTracker(defaultLimits), classify, slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer ln.Close()
	defer close(block)
	accepted := make(chan net.Conn, 2)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	for i := 0; i < 2; i++ {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if i == 0 {
			for calls.Load() == 0 {
				time.Sleep(time.Millisecond)
			}
		}
	}
	select {
	case c := <-accepted:
		c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("a hanging role lookup held up the next connection")
	}
}

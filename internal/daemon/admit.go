package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

// peerClass is what the daemon knows of a connecting uid when it admits
// a connection or a request: which pool it draws from.
type peerClass int

const (
	// peerNoRole may connect (it is in the socket's group) but holds no
	// vmcryptd role: it is answered (403) and its connection closed.
	peerNoRole peerClass = iota
	peerRole             // a role below Administrator
	peerAdmin            // role Administrator, other than root
	peerRoot             // uid 0: its own reserve
)

func (c peerClass) String() string {
	return [...]string{"no role", "role", "Administrator", "root"}[c]
}

// admitKind is what is being admitted.
type admitKind int

const (
	admitConn    admitKind = iota // a new connection
	admitRequest                  // a request on an admitted connection
)

// admitLimits are the connection and request quotas.
type admitLimits struct {
	PerPeer         int // open connections of one uid other than root
	PerPeerNoRole   int // open connections of one uid without a role
	Unprivileged    int // open connections of all uids below Administrator
	Admin           int // open connections of all Administrators but root
	Root            int // open connections of root
	PerPeerRequests int // requests in progress of one uid other than root
}

// defaultLimits: one hostile socket user fills its own quota, never the
// pools of others; Administrators and root each keep a reserve no
// unprivileged user can touch, so `status`, unmount and a SIGTERM-driven
// `lab down` always get through.
var defaultLimits = admitLimits{PerPeer: 16, PerPeerNoRole: 4, Unprivileged: 64, Admin: 32, Root: 32, PerPeerRequests: 8}

// admitLoad is the current use: for a connection, the uid's open
// connections (Peer) and those of its pool (Pool); for a request, the
// uid's requests in progress (Peer).
type admitLoad struct {
	Peer, Pool int
}

// admit decides whether one more connection or request of a peer of
// class c fits the limits, given the current load. It returns "" to
// admit, or the reason for the refusal (one line, for the client).
func admit(kind admitKind, c peerClass, load admitLoad, l admitLimits) string {
	if kind == admitRequest {
		if c != peerRoot && load.Peer >= l.PerPeerRequests {
			return fmt.Sprintf("too many requests in progress for this user (limit %d)", l.PerPeerRequests)
		}
		return ""
	}
	switch c {
	case peerRoot:
		if load.Pool >= l.Root {
			return fmt.Sprintf("too many connections from root (limit %d)", l.Root)
		}
		return ""
	case peerAdmin:
		if load.Peer >= l.PerPeer {
			return fmt.Sprintf("too many connections from this user (limit %d): close idle ones", l.PerPeer)
		}
		if load.Pool >= l.Admin {
			return fmt.Sprintf("too many Administrator connections (limit %d)", l.Admin)
		}
		return ""
	case peerRole, peerNoRole:
		per := l.PerPeer
		if c == peerNoRole {
			per = l.PerPeerNoRole
		}
		if load.Peer >= per {
			return fmt.Sprintf("too many connections from this user (limit %d): close idle ones", per)
		}
		if load.Pool >= l.Unprivileged {
			return fmt.Sprintf("too many connections from unprivileged users (limit %d); root and Administrators are still served", l.Unprivileged)
		}
		return ""
	}
	return "unknown caller class"
}

// pool is the connection pool a class draws from.
func (c peerClass) pool() int {
	switch c {
	case peerRoot:
		return 2
	case peerAdmin:
		return 1
	}
	return 0
}

// connTracker counts open connections and requests in progress per uid
// and per pool, under one lock, and admits through admit.
type connTracker struct {
	limits admitLimits

	mu     sync.Mutex
	conns  map[int]int // by uid
	reqs   map[int]int // by uid
	pools  [3]int      // unprivileged, admin, root
	logged map[int]time.Time
}

func newConnTracker(l admitLimits) *connTracker {
	return &connTracker{limits: l, conns: map[int]int{}, reqs: map[int]int{}, logged: map[int]time.Time{}}
}

// acquire admits one connection (kind admitConn) or request of uid; on
// success the caller must call release with the same arguments.
func (t *connTracker) acquire(kind admitKind, uid int, c peerClass) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	counts := t.conns
	load := admitLoad{Peer: t.conns[uid], Pool: t.pools[c.pool()]}
	if kind == admitRequest {
		counts = t.reqs
		load = admitLoad{Peer: t.reqs[uid]}
	}
	if reason := admit(kind, c, load, t.limits); reason != "" {
		return reason
	}
	counts[uid]++
	if kind == admitConn {
		t.pools[c.pool()]++
	}
	return ""
}

func (t *connTracker) release(kind admitKind, uid int, c peerClass) {
	t.mu.Lock()
	defer t.mu.Unlock()
	counts := t.conns
	if kind == admitRequest {
		counts = t.reqs
	} else {
		t.pools[c.pool()]--
	}
	if counts[uid]--; counts[uid] <= 0 {
		delete(counts, uid)
	}
}

// shouldLog rate-limits refusal log lines to one per uid every 10 s, so a
// flood does not flood the log too.
func (t *connTracker) shouldLog(uid int, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if last, ok := t.logged[uid]; ok && now.Sub(last) < 10*time.Second {
		return false
	}
	if len(t.logged) > 1024 {
		clear(t.logged)
	}
	t.logged[uid] = now
	return true
}

// admitListener accepts every connection at once (so the listen backlog
// never fills and root is never queued behind others), reads the peer's
// uid (SO_PEERCRED) and hands the connection on only if admit lets it in;
// a refused one gets a one-line 503 answer and is closed. The accepting
// goroutine only reads the uid: every connection is classified (resolving
// a role may ask a slow user directory), admitted and handed to Accept on
// a goroutine of its own, at most maxPending at a time for uids other
// than root, which never waits for a slot.
type admitListener struct {
	net.Listener
	track    *connTracker
	classify func(uid int) peerClass
	log      *slog.Logger
	// refusing bounds the goroutines answering refused connections; past
	// it, refused connections are closed without an answer.
	refusing chan struct{}
	pending  chan struct{}

	conns     chan net.Conn // admitted, for Accept
	errc      chan error    // the inner listener's final error
	done      chan struct{}
	closeOnce sync.Once
}

const maxPending = 128

func newAdmitListener(l net.Listener, t *connTracker, classify func(int) peerClass, log *slog.Logger) *admitListener {
	al := &admitListener{Listener: l, track: t, classify: classify, log: log,
		refusing: make(chan struct{}, 32), pending: make(chan struct{}, maxPending),
		conns: make(chan net.Conn), errc: make(chan error, 1), done: make(chan struct{})}
	go al.acceptLoop()
	return al
}

func (l *admitListener) acceptLoop() {
	backoff := 5 * time.Millisecond
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				l.errc <- err
				return
			}
			// Out of descriptors or the like: wait a little, go on.
			l.log.Warn("API accept failed; retrying", "err", err)
			select {
			case <-time.After(backoff):
			case <-l.done:
				l.errc <- net.ErrClosed
				return
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		uid, err := peerUID(c)
		switch {
		case err != nil:
			l.refuse(c, -1, http.StatusForbidden, "cannot identify the caller (SO_PEERCRED unavailable)")
		case uid == 0:
			// Never waits for a slot, and classifying root is instant.
			go func() { l.admit(c, uid, l.classify(uid)) }()
		default:
			select {
			case l.pending <- struct{}{}:
				go func() {
					defer func() { <-l.pending }()
					l.admit(c, uid, l.classify(uid))
				}()
			default:
				l.refuse(c, uid, http.StatusServiceUnavailable, "too many connections waiting to be admitted; try again")
			}
		}
	}
}

// admit passes c to Accept if its quota allows, or refuses it.
func (l *admitListener) admit(c net.Conn, uid int, class peerClass) {
	if reason := l.track.acquire(admitConn, uid, class); reason != "" {
		if l.track.shouldLog(uid, time.Now()) {
			l.log.Warn("API connection refused", "uid", uid, "class", class.String(), "reason", reason)
		}
		l.refuse(c, uid, http.StatusServiceUnavailable, reason)
		return
	}
	ac := &admittedConn{Conn: c, uid: uid, class: class, release: func() { l.track.release(admitConn, uid, class) }}
	select {
	case l.conns <- ac:
	case <-l.done:
		ac.Close()
	}
}

func (l *admitListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	case err := <-l.errc:
		l.errc <- err // for the next caller
		return nil, err
	}
}

func (l *admitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// refuse answers a refused connection in the background: it waits
// briefly for the request (so an HTTP client reads the answer as the
// reply to its request, not as an unsolicited one), answers and closes.
func (l *admitListener) refuse(c net.Conn, uid, code int, reason string) {
	select {
	case l.refusing <- struct{}{}:
	default:
		c.Close()
		return
	}
	go func() {
		defer func() { <-l.refusing }()
		defer c.Close()
		c.SetDeadline(time.Now().Add(500 * time.Millisecond))
		br := bufio.NewReaderSize(c, 4096)
		for {
			line, err := br.ReadSlice('\n')
			if err != nil || len(strings.TrimSpace(string(line))) == 0 {
				break
			}
		}
		msg := "vmcryptd: " + reason
		if uid >= 0 {
			msg = fmt.Sprintf("vmcryptd refused the connection of uid %d: %s", uid, reason)
		}
		body, _ := json.Marshal(api.Error{Error: msg})
		fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s",
			code, http.StatusText(code), len(body), body)
	}()
}

// admittedConn is an admitted connection: it knows its peer, and frees
// its quota once on Close.
type admittedConn struct {
	net.Conn
	uid     int
	class   peerClass
	once    sync.Once
	release func()
}

func (c *admittedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// SyscallConn exposes the underlying connection's descriptor.
func (c *admittedConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("connection has no file descriptor")
	}
	return sc.SyscallConn()
}

// peerUID reads the connecting process's uid (SO_PEERCRED); the kernel
// vouches for it, so it cannot be forged.
func peerUID(c net.Conn) (int, error) {
	uc, ok := c.(syscall.Conn)
	if !ok {
		return 0, errors.New("connection has no file descriptor")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	cerr := raw.Control(func(fd uintptr) {
		cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if cerr != nil {
		return 0, cerr
	}
	if err != nil {
		return 0, err
	}
	return int(cred.Uid), nil
}

type peerClassKey struct{}

// classCache resolves a uid's class through the authorizer, remembering
// the answer for a few seconds: accepting must stay cheap under a flood,
// and user and group lookups read /etc files.
type classCache struct {
	auth *authorizer
	ttl  time.Duration

	mu sync.Mutex
	m  map[int]classEntry
}

type classEntry struct {
	class peerClass
	at    time.Time
}

func newClassCache(a *authorizer) *classCache {
	return &classCache{auth: a, ttl: 5 * time.Second, m: map[int]classEntry{}}
}

func (cc *classCache) classify(uid int) peerClass {
	if uid == 0 {
		return peerRoot
	}
	now := time.Now()
	cc.mu.Lock()
	e, ok := cc.m[uid]
	cc.mu.Unlock()
	if ok && now.Sub(e.at) < cc.ttl {
		return e.class
	}
	c := classOf(cc.auth.resolve(uid))
	cc.mu.Lock()
	if len(cc.m) > 4096 {
		clear(cc.m)
	}
	cc.m[uid] = classEntry{c, now}
	cc.mu.Unlock()
	return c
}

// classOf maps a resolved identity to its admission class.
func classOf(id identity) peerClass {
	switch {
	case id.UID == 0:
		return peerRoot
	case id.Role == RoleAdministrator:
		return peerAdmin
	case id.Role == "":
		return peerNoRole
	}
	return peerRole
}

// connContext records the peer's uid (for the handlers) and class (for
// admitRequests) in the request context.
func connContext(ctx context.Context, c net.Conn) context.Context {
	if ac, ok := c.(*admittedConn); ok {
		ctx = context.WithValue(ctx, peerKey{}, ac.uid)
		return context.WithValue(ctx, peerClassKey{}, ac.class)
	}
	return peerContext(ctx, c)
}

// admitRequests applies the per-peer request limit, and closes the
// connection of a caller without a role after its answer (no keep-alive
// for those who may do nothing).
func admitRequests(t *connTracker, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		uid, ok := r.Context().Value(peerKey{}).(int)
		class, cok := r.Context().Value(peerClassKey{}).(peerClass)
		if !ok || !cok {
			h.ServeHTTP(w, r)
			return
		}
		if class == peerNoRole {
			w.Header().Set("Connection", "close")
		}
		if reason := t.acquire(admitRequest, uid, class); reason != "" {
			w.Header().Set("Connection", "close")
			writeJSON(w, http.StatusTooManyRequests, api.Error{Error: fmt.Sprintf("vmcryptd refused the request of uid %d: %s", uid, reason)})
			return
		}
		defer t.release(admitRequest, uid, class)
		h.ServeHTTP(w, r)
	})
}

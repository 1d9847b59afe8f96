package manager

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

// serveHosts accepts host-channel connections (mutual TLS 1.3, client
// certificates issued by the manager's CA) until ln is closed.
func (m *Manager) serveHosts(ctx context.Context, ln net.Listener) error {
	sem := make(chan struct{}, maxConns)
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			return err
		}
		select {
		case sem <- struct{}{}:
		default:
			m.log.Warn("host channel: too many connections; refused one", "remote", c.RemoteAddr().String(), "max", maxConns)
			c.Close()
			continue
		}
		go func() {
			defer func() { <-sem }()
			m.serveConn(ctx, c)
		}()
	}
}

// peer is an authenticated host-channel peer.
type peer struct {
	name   string // certificate subject CN
	serial string // certificate serial, hex
	remote string
}

func (m *Manager) serveConn(ctx context.Context, raw net.Conn) {
	defer raw.Close()
	tc := tls.Server(raw, m.tlsCfg)
	raw.SetDeadline(time.Now().Add(handshakeTimeout))
	if err := tc.HandshakeContext(ctx); err != nil {
		m.log.Info("host channel: handshake failed", "remote", raw.RemoteAddr().String(), "err", err)
		return
	}
	cs := tc.ConnectionState()
	leaf := cs.PeerCertificates[0] // RequireAndVerifyClientCert: present and CA-verified
	p := peer{name: leaf.Subject.CommonName, serial: leaf.SerialNumber.Text(16), remote: raw.RemoteAddr().String()}
	m.mu.Lock()
	m.conns[tc] = p.name
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.conns, tc)
		m.mu.Unlock()
	}()
	if cs.NegotiatedProtocol != mgrproto.ALPN {
		m.refuse(tc, p, "connect", "", nil, mgrproto.CodeBadRequest, fmt.Sprintf("the client did not negotiate ALPN %q", mgrproto.ALPN))
		return
	}
	for {
		raw.SetDeadline(time.Now().Add(idleTimeout))
		var q mgrproto.Request
		err := mgrproto.ReadFrame(tc, &q)
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) {
				return // idle or dead connection
			}
			// A frame we cannot read: answer once and close, since the
			// stream cannot be resynchronised.
			m.refuse(tc, p, "request", "", nil, mgrproto.CodeBadRequest, "bad request: "+oneLine(err.Error()))
			return
		}
		raw.SetDeadline(time.Now().Add(requestTimeout))
		if !m.handle(ctx, tc, p, &q) {
			return
		}
	}
}

// handle answers one request; false closes the connection.
func (m *Manager) handle(ctx context.Context, w io.Writer, p peer, q *mgrproto.Request) bool {
	op := q.Op
	if err := q.Check(); err != nil {
		m.refuse(w, p, "request", "", nil, mgrproto.CodeBadRequest, "bad request: "+err.Error())
		return false
	}
	// Every request re-checks the certificate against the inventory: a
	// host removed a moment ago is refused on its open connections too.
	m.mu.Lock()
	herr := checkHost(m.inv, p.name, p.serial)
	m.mu.Unlock()
	if herr != nil {
		m.refuse(w, p, op, q.VMID, keyIDs(q), mgrproto.CodeRevoked, herr.Error())
		return false
	}
	switch op {
	case mgrproto.OpHello:
		return m.hello(w, p, q)
	case mgrproto.OpCreateKey:
		return m.createKey(ctx, w, p, q)
	case mgrproto.OpGetKey:
		return m.getKey(ctx, w, p, q)
	case mgrproto.OpRegisterVM:
		return m.registerVM(w, p, q)
	case mgrproto.OpUnregisterVM:
		return m.unregisterVM(w, p, q)
	case mgrproto.OpWatch:
		return m.watch(ctx, w, p, q)
	case mgrproto.OpListPolicies:
		return m.listPolicies(w, p, q)
	case mgrproto.OpGetPolicy:
		return m.getPolicy(w, p, q)
	}
	return false // Check accepted only the ops above
}

func keyIDs(q *mgrproto.Request) []string {
	switch {
	case q.KeyID != "":
		return []string{mgrproto.KeyRef{Provider: q.Provider, KeyID: q.KeyID}.String()}
	case q.VM != nil:
		var out []string
		for _, k := range q.VM.Keys {
			out = append(out, k.String())
		}
		return out
	}
	return nil
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

var opPrivilege = map[string]string{
	mgrproto.OpHello:        privHostHello,
	mgrproto.OpCreateKey:    privHostCreate,
	mgrproto.OpGetKey:       privHostKey,
	mgrproto.OpRegisterVM:   privHostRegister,
	mgrproto.OpUnregisterVM: privHostRegister,
	mgrproto.OpWatch:        privHostHello,
	mgrproto.OpListPolicies: privHostPolicy,
	mgrproto.OpGetPolicy:    privHostPolicy,
}

// refuse audits a refusal and sends it. The reply is one line.
func (m *Manager) refuse(w io.Writer, p peer, op, vm string, keys []string, code, msg string) {
	msg = oneLine(msg)
	result := "denied"
	if code == mgrproto.CodeUnavailable || code == mgrproto.CodeInternal {
		result = "error"
	}
	if err := m.audit.write(AuditEntry{Host: p.name, Op: "host." + op, VM: vm, KeyIDs: keys, Privilege: opPrivilege[op], Result: result, Detail: msg}); err != nil {
		m.log.Error("audit log write failed", "err", err)
	}
	m.log.Warn("host request refused", "host", p.name, "op", op, "code", code, "reason", msg)
	_ = mgrproto.WriteFrame(w, mgrproto.Reply{Code: code, Error: msg})
}

// ok audits a success; the caller then sends the reply. A failed audit
// write refuses the request: nothing is handed out unaudited.
func (m *Manager) ok(w io.Writer, p peer, op, vm string, keys []string, detail string) bool {
	if err := m.audit.write(AuditEntry{Host: p.name, Op: "host." + op, VM: vm, KeyIDs: keys, Privilege: opPrivilege[op], Result: "ok", Detail: detail}); err != nil {
		m.log.Error("audit log write failed", "err", err)
		_ = mgrproto.WriteFrame(w, mgrproto.Reply{Code: mgrproto.CodeInternal, Error: "manager audit log write failed: " + oneLine(err.Error())})
		return false
	}
	return true
}

func (m *Manager) hello(w io.Writer, p peer, q *mgrproto.Request) bool {
	m.mu.Lock()
	m.seen[p.name] = hostSeen{At: time.Now(), Status: *q.Status, Remote: p.remote}
	lerr := hostLocked(m.inv, p.name)
	m.mu.Unlock()
	r := mgrproto.Reply{OK: true, Host: p.name, DefaultProvider: m.cfg.DefaultProvider, Providers: m.providerNames()}
	if lerr != nil {
		r.Locked, r.LockReason = true, lerr.Error()
	}
	return mgrproto.WriteFrame(w, r) == nil
}

// watch is the host's long poll for its lock state: answered as soon as
// the manager's lock of the host differs from what the host says it is
// (q.Locked), or after WatchHold with the current state.
func (m *Manager) watch(ctx context.Context, w io.Writer, p peer, q *mgrproto.Request) bool {
	timer := time.NewTimer(mgrproto.WatchHold)
	defer timer.Stop()
	for {
		m.mu.Lock()
		herr := checkHost(m.inv, p.name, p.serial)
		lerr := hostLocked(m.inv, p.name)
		wake := m.lockWakeLocked(p.name)
		m.mu.Unlock()
		if herr != nil {
			m.refuse(w, p, q.Op, "", nil, mgrproto.CodeRevoked, herr.Error())
			return false
		}
		locked := lerr != nil
		if locked != q.Locked {
			break
		}
		select {
		case <-wake:
			continue
		case <-timer.C:
		case <-ctx.Done():
			return false
		}
		break
	}
	m.mu.Lock()
	lerr := hostLocked(m.inv, p.name)
	m.mu.Unlock()
	r := mgrproto.Reply{OK: true, Host: p.name}
	if lerr != nil {
		r.Locked, r.LockReason = true, lerr.Error()
	}
	return mgrproto.WriteFrame(w, r) == nil
}

func (m *Manager) createKey(ctx context.Context, w io.Writer, p peer, q *mgrproto.Request) bool {
	name := q.Provider
	if name == "" {
		name = m.cfg.DefaultProvider
	}
	m.mu.Lock()
	lerr := hostLocked(m.inv, p.name)
	m.mu.Unlock()
	if lerr != nil {
		m.refuse(w, p, q.Op, "", nil, mgrproto.CodeHostLocked, lerr.Error())
		return true
	}
	prov, ok := m.providers[name]
	if !ok {
		m.refuse(w, p, q.Op, "", nil, mgrproto.CodeBadRequest, fmt.Sprintf("key provider %q is not configured on the manager (it has %s)", name, strings.Join(m.providerNames(), ", ")))
		return true
	}
	id, err := prov.CreateKey(ctx, q.Name)
	if err != nil {
		m.refuse(w, p, q.Op, "", nil, mgrproto.CodeUnavailable, fmt.Sprintf("create key on provider %q: %v", name, err))
		return true
	}
	ref := mgrproto.KeyRef{Provider: name, KeyID: id}
	m.mu.Lock()
	err = m.updateLocked(func(inv *inventory) error {
		inv.Keys[ref.String()] = &keyRec{Ref: ref, CreatedFor: p.name, Created: time.Now().UTC()}
		return nil
	})
	m.mu.Unlock()
	if err != nil {
		m.refuse(w, p, q.Op, "", []string{ref.String()}, mgrproto.CodeInternal, "key "+ref.String()+" was made but the inventory could not be saved: "+err.Error())
		return true
	}
	if !m.ok(w, p, q.Op, "", []string{ref.String()}, "name "+q.Name) {
		return false
	}
	return mgrproto.WriteFrame(w, mgrproto.Reply{OK: true, Provider: name, KeyID: id}) == nil
}

func (m *Manager) getKey(ctx context.Context, w io.Writer, p peer, q *mgrproto.Request) bool {
	ref := mgrproto.KeyRef{Provider: q.Provider, KeyID: q.KeyID}
	keys := []string{ref.String()}
	m.mu.Lock()
	lerr := hostLocked(m.inv, p.name)
	perr := mayGetKey(m.inv, p.name, ref, q.VMID)
	m.mu.Unlock()
	if lerr != nil {
		m.refuse(w, p, q.Op, q.VMID, keys, mgrproto.CodeHostLocked, lerr.Error())
		return true
	}
	if perr != nil {
		m.refuse(w, p, q.Op, q.VMID, keys, mgrproto.CodeDenied, "permission denied: "+perr.Error())
		return true
	}
	prov, ok := m.providers[ref.Provider]
	if !ok {
		m.refuse(w, p, q.Op, q.VMID, keys, mgrproto.CodeUnavailable, fmt.Sprintf("key provider %q is not configured on the manager", ref.Provider))
		return true
	}
	alive := true
	err := m.keys.with(ctx, prov, ref, func(key []byte, state string) error {
		// Again after the KMS fetch: a lock that came meanwhile wins.
		m.mu.Lock()
		lerr := hostLocked(m.inv, p.name)
		m.mu.Unlock()
		if lerr != nil {
			m.refuse(w, p, q.Op, q.VMID, keys, mgrproto.CodeHostLocked, lerr.Error())
			return nil
		}
		if !m.ok(w, p, q.Op, q.VMID, keys, "state "+state) {
			alive = false
			return nil
		}
		if err := mgrproto.WriteFrame(w, mgrproto.Reply{OK: true, State: state, KeyLen: len(key)}); err != nil {
			alive = false
			return nil
		}
		if _, err := w.Write(key); err != nil {
			alive = false
		}
		return nil
	})
	if err != nil {
		m.refuse(w, p, q.Op, q.VMID, keys, mgrproto.CodeUnavailable, fmt.Sprintf("fetch key %s from the KMS: %v", ref, err))
		return true
	}
	return alive
}

func (m *Manager) registerVM(w io.Writer, p peer, q *mgrproto.Request) bool {
	vm := *q.VM
	keys := keyIDs(q)
	m.mu.Lock()
	err := mayRegister(m.inv, p.name, vm)
	if err == nil {
		err = mayRegisterPolicy(m.inv, vm)
	}
	policy := registeredPolicy(m.inv.VMs[vm.ID], vm.Policy)
	if err == nil {
		err = m.updateLocked(func(inv *inventory) error {
			inv.VMs[vm.ID] = &vmRec{ID: vm.ID, Name: vm.Name, Dir: vm.Dir, Host: p.name, Keys: vm.Keys, Registered: time.Now().UTC(), Policy: policy}
			for _, ref := range vm.Keys {
				if k := inv.Keys[ref.String()]; k != nil {
					k.CreatedFor = "" // bound to a VM now
				}
			}
			return nil
		})
		if err != nil {
			m.mu.Unlock()
			m.refuse(w, p, q.Op, vm.ID, keys, mgrproto.CodeInternal, "inventory could not be saved: "+err.Error())
			return true
		}
	}
	m.mu.Unlock()
	if err != nil {
		m.refuse(w, p, q.Op, vm.ID, keys, mgrproto.CodeDenied, "permission denied: "+err.Error())
		return true
	}
	if !m.ok(w, p, q.Op, vm.ID, keys, vm.Dir+" policy "+policy) {
		return false
	}
	return mgrproto.WriteFrame(w, mgrproto.Reply{OK: true}) == nil
}

func (m *Manager) unregisterVM(w io.Writer, p peer, q *mgrproto.Request) bool {
	m.mu.Lock()
	err := mayUnregister(m.inv, p.name, q.VMID)
	var keys []string
	if err == nil {
		if cur := m.inv.VMs[q.VMID]; cur != nil {
			for _, k := range cur.Keys {
				keys = append(keys, k.String())
			}
		}
		if serr := m.updateLocked(func(inv *inventory) error {
			delete(inv.VMs, q.VMID)
			return nil
		}); serr != nil {
			m.mu.Unlock()
			m.refuse(w, p, q.Op, q.VMID, keys, mgrproto.CodeInternal, "inventory could not be saved: "+serr.Error())
			return true
		}
	}
	m.mu.Unlock()
	if err != nil {
		m.refuse(w, p, q.Op, q.VMID, nil, mgrproto.CodeDenied, "permission denied: "+err.Error())
		return true
	}
	if !m.ok(w, p, q.Op, q.VMID, keys, "") {
		return false
	}
	return mgrproto.WriteFrame(w, mgrproto.Reply{OK: true}) == nil
}

// listPolicies answers every storage policy, each resolved as get_policy
// would (a policy whose provider is gone is listed without one).
func (m *Manager) listPolicies(w io.Writer, p peer, q *mgrproto.Request) bool {
	m.mu.Lock()
	recs := allPolicies(m.inv)
	out := make([]mgrproto.Policy, 0, len(recs))
	for _, r := range recs {
		pol, err := resolvePolicy(m.inv, r.Name, m.cfg.DefaultProvider, m.providerNames())
		if err != nil {
			_, bi := builtinPolicy(r.Name)
			pol = mgrproto.Policy{Name: r.Name, Encrypts: r.Encrypts, Builtin: bi, Description: r.Description}
		}
		out = append(out, pol)
	}
	m.mu.Unlock()
	r := mgrproto.Reply{OK: true, Policies: out}
	if b, err := json.Marshal(r); err != nil || len(b) > mgrproto.MaxFrame {
		// mayCreatePolicy keeps the list within a frame; a provider
		// renamed in manager.toml since could still push it over.
		m.refuse(w, p, q.Op, "", nil, mgrproto.CodeInternal, fmt.Sprintf("the %d storage policies do not fit in one frame of %d bytes: shorten their descriptions", len(out), mgrproto.MaxFrame))
		return true
	}
	return mgrproto.WriteFrame(w, r) == nil
}

// getPolicy resolves one storage policy for a `vmcryptd policy set` on
// the host: audited, since it decides what the host does to a VM.
func (m *Manager) getPolicy(w io.Writer, p peer, q *mgrproto.Request) bool {
	m.mu.Lock()
	pol, err := resolvePolicy(m.inv, q.Policy, m.cfg.DefaultProvider, m.providerNames())
	m.mu.Unlock()
	var nf errPolicyNotFound
	switch {
	case errors.As(err, &nf):
		m.refuse(w, p, q.Op, "", nil, mgrproto.CodeNotFound, err.Error())
		return true
	case err != nil:
		m.refuse(w, p, q.Op, "", nil, mgrproto.CodeUnavailable, err.Error())
		return true
	}
	detail := fmt.Sprintf("policy %q: decrypts", pol.Name)
	if pol.Encrypts {
		detail = fmt.Sprintf("policy %q: encrypts under provider %s", pol.Name, pol.Provider)
	}
	if !m.ok(w, p, q.Op, "", nil, detail) {
		return false
	}
	return mgrproto.WriteFrame(w, mgrproto.Reply{OK: true, Policy: &pol}) == nil
}

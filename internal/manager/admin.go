package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"sort"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
	"github.com/vmcryptd/vmcryptd/internal/pki"
)

// Service is the "service" field of the manager's status, which tells
// the CLI it talks to a manager and not a host daemon.
const Service = "vmcryptd-manager"

// Status is the answer of GET /v1/status on the admin socket.
type Status struct {
	Service         string         `json:"service"`
	Version         string         `json:"version"`
	PID             int            `json:"pid"`
	Started         time.Time      `json:"started"`
	Caller          api.Caller     `json:"caller"`
	Listen          string         `json:"listen"`
	DefaultProvider string         `json:"default_provider"`
	Providers       []ProviderInfo `json:"providers"`
	Hosts           []HostInfo     `json:"hosts"`
	VMs             []VMInfo       `json:"vms"`
	Policies        []PolicyInfo   `json:"policies"`
	CachedKeys      int            `json:"cached_keys"`
	KeysLocked      bool           `json:"keys_mlocked"`
	// KMSFetches counts keys fetched from the KMS since start (each key
	// once, however many hosts asked).
	KMSFetches int64 `json:"kms_fetches"`
}

// ProviderInfo is one key provider of the manager.
type ProviderInfo struct {
	Name    string   `json:"name"`
	Servers []string `json:"servers"`
	Default bool     `json:"default"`
}

// HostInfo is one registered host.
type HostInfo struct {
	Name     string    `json:"name"`
	Address  string    `json:"address,omitempty"`
	Serial   string    `json:"cert_serial"`
	Added    time.Time `json:"added"`
	LastSeen time.Time `json:"last_seen,omitzero"`
	// Connected is whether a host-channel connection is open now.
	Connected bool `json:"connected"`
	// HostEncryption reports the host encryption mode from its last
	// hello: "enabled", "disabled" or "" (never seen).
	HostEncryption string   `json:"host_encryption,omitempty"`
	HostKey        string   `json:"host_key,omitempty"`
	VMs            int      `json:"vms"`
	KeysHeld       []string `json:"keys_held"`
	// Locked is set by `manager host lock` until `manager host unlock`.
	Locked   bool      `json:"locked"`
	LockedAt time.Time `json:"locked_at,omitzero"`
	LockedBy string    `json:"locked_by,omitempty"`
}

// HostLockReply answers POST /v1/hosts/NAME/lock and /unlock.
type HostLockReply struct {
	Name   string `json:"name"`
	Locked bool   `json:"locked"`
	// Changed is false when the host already was in that state.
	Changed bool `json:"changed"`
}

// VMInfo is one VM registration with its lock state as its host last
// reported it.
type VMInfo struct {
	ID     string   `json:"id"`
	Name   string   `json:"name,omitempty"`
	Dir    string   `json:"dir,omitempty"`
	Host   string   `json:"host"`
	Keys   []string `json:"keys"`
	Policy string   `json:"policy"`
	Locked bool     `json:"locked"`
	Reason string   `json:"reason,omitempty"`
}

// PolicyInfo is one storage policy (GET /v1/policies, POST /v1/policies).
type PolicyInfo struct {
	Name     string `json:"name"`
	Encrypts bool   `json:"encrypts"`
	// Provider is the policy's own key provider; empty: the manager's
	// default. ResolvedProvider is the one a VM put under it now gets
	// (empty when the policy does not encrypt, or its provider is gone).
	Provider         string    `json:"provider,omitempty"`
	ResolvedProvider string    `json:"resolved_provider,omitempty"`
	Builtin          bool      `json:"builtin"`
	Description      string    `json:"description,omitempty"`
	Created          time.Time `json:"created,omitzero"`
	CreatedBy        string    `json:"created_by,omitempty"`
	// VMs counts the registered VMs under the policy.
	VMs int `json:"vms"`
}

// PolicyRemoved answers DELETE /v1/policies/NAME.
type PolicyRemoved struct {
	Name string `json:"name"`
}

// HostAddRequest is POST /v1/hosts.
type HostAddRequest struct {
	Name    string `json:"name"`
	Address string `json:"address,omitempty"`
	// CSR is a PEM certificate request the host made (`vmcryptd host
	// join`): the manager signs it and the answer holds no private key.
	CSR string `json:"csr,omitempty"`
}

// HostBundle answers host add: the host's credentials for [manager].
// The private key exists only in this answer and in the files the CLI
// writes from it; the manager keeps the certificate's serial.
type HostBundle struct {
	Name           string `json:"name"`
	Serial         string `json:"cert_serial"`
	ManagerAddress string `json:"manager_address"`
	CAPEM          string `json:"ca_pem"`
	CertPEM        string `json:"cert_pem"`
	KeyPEM         string `json:"key_pem,omitempty"` // absent when signed from a CSR
}

// HostRemoved answers DELETE /v1/hosts/NAME.
type HostRemoved struct {
	Name        string   `json:"name"`
	Serial      string   `json:"revoked_serial"`
	ReleasedVMs []string `json:"released_vms"`
}

type peerKey struct{}

func peerContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(syscall.Conn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	var gerr error
	if raw.Control(func(fd uintptr) { cred, gerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }) != nil || gerr != nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, int(cred.Uid))
}

type adminCtx struct {
	w    http.ResponseWriter
	r    *http.Request
	uid  int
	user string
	role string
}

func (m *Manager) adminRoutes() http.Handler {
	mux := http.NewServeMux()
	route := func(pattern, priv string, h func(*adminCtx) (any, error)) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			uid, ok := r.Context().Value(peerKey{}).(int)
			if !ok {
				writeErr(w, http.StatusForbidden, "cannot identify the caller (SO_PEERCRED)", "")
				return
			}
			name, _ := m.lookupU(uid)
			if name == "" {
				name = strconv.Itoa(uid)
			}
			ac := &adminCtx{w: w, r: r, uid: uid, user: name, role: roleOf(m.cfg.Roles, uid, m.lookupU)}
			if !roleAllows(ac.role, priv) {
				msg := fmt.Sprintf("permission denied: %s needs privilege %s (you are %s, role %q)", r.URL.Path, priv, name, ac.role)
				if priv != PrivRead {
					m.auditAdmin(ac, r.Method+" "+r.URL.Path, priv, "denied", msg)
				}
				writeErr(w, http.StatusForbidden, msg, priv)
				return
			}
			r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
			res, err := h(ac)
			if err != nil {
				var he *httpErr
				if errors.As(err, &he) {
					writeErr(w, he.code, he.msg, "")
				} else {
					writeErr(w, http.StatusInternalServerError, err.Error(), "")
				}
				return
			}
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(res)
		})
	}
	p := api.Prefix
	route("GET "+p+"/status", PrivRead, m.hStatus)
	route("GET "+p+"/hosts", PrivRead, func(*adminCtx) (any, error) { return m.hostInfos(), nil })
	route("POST "+p+"/hosts", PrivRegisterHost, m.hHostAdd)
	route("DELETE "+p+"/hosts/{name}", PrivRegisterHost, m.hHostRemove)
	route("POST "+p+"/hosts/{name}/lock", PrivManageKeys, func(ac *adminCtx) (any, error) { return m.hHostLock(ac, true) })
	route("POST "+p+"/hosts/{name}/unlock", PrivManageKeys, func(ac *adminCtx) (any, error) { return m.hHostLock(ac, false) })
	route("GET "+p+"/policies", PrivRead, func(*adminCtx) (any, error) { return m.policyInfos(), nil })
	route("POST "+p+"/policies", PrivManagePolicy, m.hPolicyCreate)
	route("DELETE "+p+"/policies/{name}", PrivManagePolicy, m.hPolicyRemove)
	return mux
}

type httpErr struct {
	code int
	msg  string
}

func (e *httpErr) Error() string { return e.msg }

func writeErr(w http.ResponseWriter, code int, msg, priv string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(api.Error{Error: oneLine(msg), MissingPrivilege: priv})
}

func (m *Manager) auditAdmin(ac *adminCtx, op, priv, result, detail string) error {
	uid := ac.uid
	return m.audit.write(AuditEntry{UID: &uid, Op: op, Privilege: priv, Result: result, Detail: detail})
}

func (m *Manager) hStatus(ac *adminCtx) (any, error) {
	n, locked := m.keys.count()
	m.mu.Lock()
	listen := m.listen
	m.mu.Unlock()
	st := Status{
		Service: Service, Version: m.version, PID: os.Getpid(), Started: m.started,
		Caller:          api.Caller{UID: ac.uid, User: ac.user, Role: ac.role, Privileges: rolePrivileges[ac.role]},
		Listen:          listen,
		DefaultProvider: m.cfg.DefaultProvider,
		Providers:       []ProviderInfo{},
		Hosts:           m.hostInfos(),
		VMs:             m.vmInfos(),
		Policies:        m.policyInfos(),
		CachedKeys:      n, KeysLocked: locked,
		KMSFetches: m.keys.fetches.Load(),
	}
	for _, name := range m.providerNames() {
		st.Providers = append(st.Providers, ProviderInfo{Name: name, Servers: m.providers[name].Servers(), Default: name == m.cfg.DefaultProvider})
	}
	return st, nil
}

func (m *Manager) hostInfos() []HostInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	connected := map[string]bool{}
	for _, h := range m.conns {
		connected[h] = true
	}
	out := []HostInfo{}
	for _, h := range m.inv.Hosts {
		hi := HostInfo{Name: h.Name, Address: h.Address, Serial: h.Serial, Added: h.Added, Connected: connected[h.Name],
			VMs: len(m.inv.vmsOf(h.Name)), KeysHeld: []string{}}
		if h.Lock != nil {
			hi.Locked, hi.LockedAt, hi.LockedBy = true, h.Lock.At, h.Lock.By
		}
		if s, ok := m.seen[h.Name]; ok {
			hi.LastSeen = s.At
			hi.HostEncryption = "disabled"
			if s.Status.HostKey != nil {
				hi.HostEncryption = "enabled"
				hi.HostKey = s.Status.HostKey.String()
			}
			for _, k := range s.Status.Held {
				hi.KeysHeld = append(hi.KeysHeld, k.String())
			}
			if hi.Address == "" {
				hi.Address = s.Remote
			}
		}
		out = append(out, hi)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (m *Manager) vmInfos() []VMInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := []VMInfo{}
	for _, vm := range m.inv.VMs {
		vi := VMInfo{ID: vm.ID, Name: vm.Name, Dir: vm.Dir, Host: vm.Host, Keys: []string{}, Policy: registeredPolicy(vm, "")}
		s, seen := m.seen[vm.Host]
		held := map[mgrproto.KeyRef]bool{}
		for _, k := range s.Status.Held {
			held[k] = true
		}
		for _, k := range vm.Keys {
			vi.Keys = append(vi.Keys, k.String())
			if !held[k] && !vi.Locked {
				vi.Locked = true
				vi.Reason = "host " + vm.Host + " does not hold key " + k.String()
				if !seen {
					vi.Reason = "host " + vm.Host + " has not reported since the manager started"
				}
			}
		}
		out = append(out, vi)
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Host+"/"+out[i].Dir+out[i].ID < out[j].Host+"/"+out[j].Dir+out[j].ID
	})
	return out
}

// hostName is what a host may be called: it becomes a certificate CN
// and a directory name in labs.
var hostName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

func (m *Manager) hHostAdd(ac *adminCtx) (any, error) {
	var req HostAddRequest
	dec := json.NewDecoder(ac.r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil && !errors.Is(err, io.EOF) {
		return nil, &httpErr{400, "bad request: " + err.Error()}
	}
	if !hostName.MatchString(req.Name) {
		return nil, &httpErr{400, fmt.Sprintf("host name %q: use 1-63 letters, digits, '.', '_' or '-'", req.Name)}
	}
	if req.Address != "" {
		if _, _, err := net.SplitHostPort(req.Address); err != nil {
			return nil, &httpErr{400, fmt.Sprintf("host address %q: %v", req.Address, err)}
		}
	}
	m.mu.Lock()
	_, exists := m.inv.Hosts[req.Name]
	m.mu.Unlock()
	if exists {
		return nil, &httpErr{409, fmt.Sprintf("host %q already exists (remove it first to issue a new certificate)", req.Name)}
	}
	var pair *pki.Pair
	var err error
	how := "issued with a new key"
	if req.CSR != "" {
		how = "signed from the host's CSR"
		pair, err = m.ca.SignClientCSR([]byte(req.CSR), req.Name)
		if err != nil {
			msg := fmt.Sprintf("host %s: CSR refused: %v", req.Name, err)
			if aerr := m.auditAdmin(ac, "manager.host.add", PrivRegisterHost, "denied", msg); aerr != nil {
				return nil, aerr
			}
			return nil, &httpErr{400, msg}
		}
	} else if pair, err = m.ca.IssueClient(req.Name); err != nil {
		return nil, err
	}
	serial := pair.Cert.SerialNumber.Text(16)
	m.mu.Lock()
	err = m.updateLocked(func(inv *inventory) error {
		if _, ok := inv.Hosts[req.Name]; ok {
			return &httpErr{409, fmt.Sprintf("host %q already exists", req.Name)}
		}
		inv.Hosts[req.Name] = &hostRec{Name: req.Name, Address: req.Address, Serial: serial, Added: time.Now().UTC()}
		return nil
	})
	listen := m.listen
	m.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := m.auditAdmin(ac, "manager.host.add", PrivRegisterHost, "ok", "host "+req.Name+" certificate "+serial+" "+how); err != nil {
		return nil, err
	}
	return HostBundle{Name: req.Name, Serial: serial, ManagerAddress: listen, CAPEM: string(m.ca.CertPEM),
		CertPEM: string(pair.CertPEM), KeyPEM: string(pair.KeyPEM)}, nil
}

func (m *Manager) hHostRemove(ac *adminCtx) (any, error) {
	name := ac.r.PathValue("name")
	res := HostRemoved{Name: name, ReleasedVMs: []string{}}
	m.mu.Lock()
	err := m.updateLocked(func(inv *inventory) error {
		h, ok := inv.Hosts[name]
		if !ok {
			return &httpErr{404, fmt.Sprintf("host %q is not in the inventory", name)}
		}
		res.Serial = h.Serial
		inv.Revoked[h.Serial] = revokedRec{Host: name, Revoked: time.Now().UTC()}
		delete(inv.Hosts, name)
		// Its VMs are released (they may be registered on another host);
		// keys made for it and not bound to a VM are no longer its.
		for id, vm := range inv.VMs {
			if vm.Host == name {
				res.ReleasedVMs = append(res.ReleasedVMs, id)
				delete(inv.VMs, id)
			}
		}
		for _, k := range inv.Keys {
			if k.CreatedFor == name {
				k.CreatedFor = ""
			}
		}
		return nil
	})
	// Open connections of the host are cut now, not at their next request.
	if err == nil {
		for c, h := range m.conns {
			if h == name {
				c.Close()
			}
		}
		delete(m.seen, name)
		m.wakeLocked(name)
	}
	m.mu.Unlock()
	if err != nil {
		return nil, err
	}
	sort.Strings(res.ReleasedVMs)
	if err := m.auditAdmin(ac, "manager.host.remove", PrivRegisterHost, "ok", fmt.Sprintf("host %s certificate %s revoked; %d VMs released", name, res.Serial, len(res.ReleasedVMs))); err != nil {
		return nil, err
	}
	return res, nil
}

// hHostLock is `manager host lock NAME` (lock) and `manager host unlock
// NAME`: the lock is saved in the inventory (it survives a restart), the
// host's watch requests are woken at once (the host zeroes every key),
// and get_key and create_key refuse the host with host_locked until the
// unlock.
func (m *Manager) hHostLock(ac *adminCtx, lock bool) (any, error) {
	name := ac.r.PathValue("name")
	op := "manager.host.unlock"
	if lock {
		op = "manager.host.lock"
	}
	res := HostLockReply{Name: name, Locked: lock}
	m.mu.Lock()
	err := m.updateLocked(func(inv *inventory) error {
		h, ok := inv.Hosts[name]
		if !ok {
			return &httpErr{404, fmt.Sprintf("host %q is not in the inventory", name)}
		}
		res.Changed = (h.Lock != nil) != lock
		if !res.Changed {
			return nil
		}
		if lock {
			h.Lock = &hostLock{At: time.Now().UTC(), UID: ac.uid, By: ac.user}
		} else {
			h.Lock = nil
		}
		return nil
	})
	if err == nil && res.Changed {
		m.wakeLocked(name)
	}
	m.mu.Unlock()
	if err != nil {
		if aerr := m.auditAdmin(ac, op, PrivManageKeys, "error", "host "+name+": "+err.Error()); aerr != nil {
			m.log.Error("audit log write failed", "err", aerr)
		}
		return nil, err
	}
	detail := "host " + name + " locked: every key is to be zeroed there, none handed out"
	if !lock {
		detail = "host " + name + " unlocked: it may fetch its keys again"
	}
	if !res.Changed {
		detail = "host " + name + " already " + map[bool]string{true: "locked", false: "unlocked"}[lock]
	}
	if err := m.auditAdmin(ac, op, PrivManageKeys, "ok", detail); err != nil {
		return nil, err
	}
	m.log.Warn("host lock changed", "host", name, "locked", lock, "changed", res.Changed, "by", ac.user)
	return res, nil
}

func (m *Manager) policyInfos() []PolicyInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.policyInfosLocked()
}

func (m *Manager) policyInfosLocked() []PolicyInfo {
	used := map[string]int{}
	for _, vm := range m.inv.VMs {
		used[registeredPolicy(vm, "")]++
	}
	out := []PolicyInfo{}
	for _, r := range allPolicies(m.inv) {
		_, bi := builtinPolicy(r.Name)
		pi := PolicyInfo{Name: r.Name, Encrypts: r.Encrypts, Provider: r.Provider, Builtin: bi, Description: r.Description,
			Created: r.Created, CreatedBy: r.CreatedBy, VMs: used[r.Name]}
		if pol, err := resolvePolicy(m.inv, r.Name, m.cfg.DefaultProvider, m.providerNames()); err == nil {
			pi.ResolvedProvider = pol.Provider
		}
		out = append(out, pi)
	}
	return out
}

// hPolicyCreate is `manager policy create NAME [--encrypt [--provider
// P]]`: the policy is saved in the inventory before the answer.
func (m *Manager) hPolicyCreate(ac *adminCtx) (any, error) {
	var req PolicyCreateRequest
	dec := json.NewDecoder(ac.r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return nil, &httpErr{400, "bad request: " + err.Error()}
	}
	m.mu.Lock()
	err := m.updateLocked(func(inv *inventory) error {
		if err := mayCreatePolicy(inv, req, m.providerNames()); err != nil {
			code := 400
			var ex errPolicyExists
			if errors.As(err, &ex) {
				code = 409
			}
			return &httpErr{code, err.Error()}
		}
		inv.Policies[req.Name] = &policyRec{Name: req.Name, Encrypts: req.Encrypt, Provider: req.Provider,
			Description: req.Description, Created: time.Now().UTC(), CreatedBy: ac.user}
		return nil
	})
	var info PolicyInfo
	if err == nil {
		for _, pi := range m.policyInfosLocked() {
			if pi.Name == req.Name {
				info = pi
			}
		}
	}
	m.mu.Unlock()
	if err != nil {
		result := "denied"
		var he *httpErr
		if !errors.As(err, &he) {
			result = "error"
		}
		if aerr := m.auditAdmin(ac, "manager.policy.create", PrivManagePolicy, result, fmt.Sprintf("policy %q: %v", req.Name, err)); aerr != nil {
			m.log.Error("audit log write failed", "err", aerr)
		}
		return nil, err
	}
	what := "decrypts (stores VMs plain)"
	if req.Encrypt {
		what = "encrypts under provider " + orDefault(req.Provider)
	}
	if err := m.auditAdmin(ac, "manager.policy.create", PrivManagePolicy, "ok", fmt.Sprintf("policy %q created: %s", req.Name, what)); err != nil {
		return nil, err
	}
	return info, nil
}

func orDefault(provider string) string {
	if provider == "" {
		return "(the manager's default)"
	}
	return provider
}

// hPolicyRemove is `manager policy remove NAME`: refused for a built-in
// and while a VM of the inventory is under the policy.
func (m *Manager) hPolicyRemove(ac *adminCtx) (any, error) {
	name := ac.r.PathValue("name")
	m.mu.Lock()
	err := m.updateLocked(func(inv *inventory) error {
		if err := mayRemovePolicy(inv, name); err != nil {
			var nf errPolicyNotFound
			if errors.As(err, &nf) {
				return &httpErr{404, err.Error()}
			}
			return &httpErr{409, err.Error()}
		}
		delete(inv.Policies, name)
		return nil
	})
	m.mu.Unlock()
	if err != nil {
		result := "denied"
		var he *httpErr
		if !errors.As(err, &he) {
			result = "error"
		}
		if aerr := m.auditAdmin(ac, "manager.policy.remove", PrivManagePolicy, result, fmt.Sprintf("policy %q: %v", name, err)); aerr != nil {
			m.log.Error("audit log write failed", "err", aerr)
		}
		return nil, err
	}
	if err := m.auditAdmin(ac, "manager.policy.remove", PrivManagePolicy, "ok", fmt.Sprintf("policy %q removed", name)); err != nil {
		return nil, err
	}
	return PolicyRemoved{Name: name}, nil
}

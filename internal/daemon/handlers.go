package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/kms"
)

// reqCtx is one authorised request.
type reqCtx struct {
	w  http.ResponseWriter
	r  *http.Request
	id identity
	op string

	streaming bool
	enc       *json.Encoder
}

// stream switches the answer to application/x-ndjson and returns the
// function that sends one progress line. Errors found before calling it
// still get their proper HTTP status.
func (rc *reqCtx) stream() func(progress any) {
	rc.streaming = true
	rc.w.Header().Set("Content-Type", "application/x-ndjson")
	rc.w.WriteHeader(http.StatusOK)
	rc.enc = json.NewEncoder(rc.w)
	fl, _ := rc.w.(http.Flusher)
	return func(progress any) {
		raw, err := json.Marshal(progress)
		if err != nil {
			return
		}
		rc.enc.Encode(api.StreamLine{Progress: raw})
		if fl != nil {
			fl.Flush()
		}
	}
}

// handler is an API operation body; it returns the response (JSON) or an
// error carrying an HTTP status.
type handler func(rc *reqCtx) (any, error)

type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

func badRequest(format string, a ...any) error {
	return &httpError{http.StatusBadRequest, fmt.Sprintf(format, a...)}
}
func conflict(format string, a ...any) error {
	return &httpError{http.StatusConflict, fmt.Sprintf(format, a...)}
}
func forbidden(format string, a ...any) error {
	return &httpError{http.StatusForbidden, fmt.Sprintf(format, a...)}
}
func notFound(format string, a ...any) error {
	return &httpError{http.StatusNotFound, fmt.Sprintf(format, a...)}
}

func (d *Daemon) routes() http.Handler {
	mux := http.NewServeMux()
	p := api.Prefix
	mux.Handle("GET "+p+"/status", d.op("status", PrivRead, false, d.hStatus))
	mux.Handle("GET "+p+"/host/encryption", d.op("host.encryption.status", PrivRead, false, d.hHostStatus))
	mux.Handle("POST "+p+"/host/encryption", d.op("host.encryption.set", PrivRegisterHost, true, d.hHostSet))
	mux.Handle("GET "+p+"/kms", d.op("kms.list", PrivRead, false, d.hKMSList))
	mux.Handle("POST "+p+"/kms", d.op("kms.add", PrivManageKeyServers, true, d.hKMSAdd))
	mux.Handle("DELETE "+p+"/kms/{name}", d.op("kms.remove", PrivManageKeyServers, true, d.hKMSRemove))
	mux.Handle("GET "+p+"/kms/{name}/status", d.op("kms.status", PrivRead, false, d.hKMSStatus))
	mux.Handle("POST "+p+"/keys", d.op("key.create", PrivManageKeys, true, d.hKeyCreate))
	mux.Handle("POST "+p+"/lock", d.op("lock", PrivManageKeys, true, d.hLock))
	mux.Handle("POST "+p+"/unlock", d.op("unlock", PrivManageKeys, true, d.hUnlock))
	mux.Handle("POST "+p+"/reload", d.op("reload", PrivManageKeyServers, true, d.hReload))
	mux.Handle("POST "+p+"/vm/encrypt", d.op("vm.encrypt", PrivEncrypt, true, d.hVMEncrypt))
	mux.Handle("POST "+p+"/vm/decrypt", d.op("vm.decrypt", PrivDecrypt, true, d.hVMDecrypt))
	mux.Handle("POST "+p+"/vm/rekey", d.op("vm.rekey", PrivRecrypt, true, d.hVMRekey))
	mux.Handle("POST "+p+"/vm/policy", d.op("vm.policy", PrivManageEncryptionPolicy, true, d.hVMPolicy))
	mux.Handle("GET "+p+"/vm/status", d.op("vm.status", PrivRead, false, d.hVMStatus))
	mux.Handle("POST "+p+"/vm/register", d.op("vm.register", PrivRegisterVM, true, d.hVMRegister))
	mux.Handle("POST "+p+"/vm/unregister", d.op("vm.unregister", PrivRegisterVM, true, d.hVMUnregister))
	mux.Handle("POST "+p+"/vm/check", d.op("vm.check", PrivRead, true, d.hVMCheck))
	mux.Handle("GET "+p+"/policies", d.op("policy.list", PrivRead, false, d.hPolicyList))
	// Plain VM management is not cryptographic (a NoCryptoAdmin may do it);
	// the handlers demand the crypto privilege when the VM is encrypted.
	mux.Handle("POST "+p+"/vm/create", d.op("vm.create", PrivVMConfig, true, d.hVMCreate))
	mux.Handle("POST "+p+"/disk/add", d.op("disk.add", PrivVMConfig, true, d.hDiskAdd))
	mux.Handle("POST "+p+"/disk/attach", d.op("disk.attach", PrivVMConfig, true, d.hDiskAttach))
	mux.Handle("POST "+p+"/disk/restore-keys", d.op("disk.restore-keys", PrivAddDisk, true, d.hDiskRestoreKeys))
	mux.Handle("POST "+p+"/mounts", d.op("mount", PrivAccess, true, d.hMount))
	mux.Handle("POST "+p+"/unmount", d.op("unmount", PrivAccess, true, d.hUnmount))
	mux.Handle("POST "+p+"/exports", d.op("export.start", PrivAccess, true, d.hExportStart))
	mux.Handle("POST "+p+"/exports/stop", d.op("export.stop", PrivAccess, true, d.hExportStop))
	mux.Handle("GET "+p+"/exports", d.op("export.list", PrivRead, false, d.hExportList))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, api.Error{Error: fmt.Sprintf("no such API endpoint: %s %s", r.Method, r.URL.Path)})
	})
	return mux
}

// op wraps an operation: resolve the caller, check the privilege (403 and
// an audit line when missing), run it, audit cryptographic operations.
func (d *Daemon) op(name string, priv Privilege, audited bool, h handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		uid, ok := r.Context().Value(peerKey{}).(int)
		if !ok {
			writeJSON(w, http.StatusForbidden, api.Error{Error: "cannot identify the caller (SO_PEERCRED unavailable)"})
			return
		}
		id := d.auth.resolve(uid)
		if !d.auth.allowed(id, priv) {
			msg := fmt.Sprintf("permission denied: %s needs privilege %s", name, priv)
			if id.Role == "" {
				msg = fmt.Sprintf("permission denied: user %s (uid %d) has no vmcryptd role", id.User, id.UID)
			} else {
				msg += fmt.Sprintf(", which role %s of user %s does not have", id.Role, id.User)
			}
			d.auditWrite(AuditEntry{UID: id.UID, User: id.User, Role: id.Role, Op: name, Target: r.URL.Path, Result: "denied", Detail: string(priv)})
			d.metrics.requests.WithLabelValues(name, "denied").Inc()
			writeJSON(w, http.StatusForbidden, api.Error{Error: msg, MissingPrivilege: string(priv)})
			return
		}
		// The (small) body is read here, under the server's ReadTimeout,
		// so a client trickling it cannot hold one of the few connection
		// slots; then the read deadline is lifted, or it would cancel a
		// long operation that streams its progress.
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, api.MaxRequestBytes))
		if err != nil {
			msg := fmt.Sprintf("reading request body: %v", err)
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				msg = fmt.Sprintf("request body larger than %d bytes", api.MaxRequestBytes)
			}
			writeJSON(w, http.StatusBadRequest, api.Error{Error: msg})
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		if err := http.NewResponseController(w).SetReadDeadline(time.Time{}); err != nil {
			d.log.Warn("cannot lift the request read deadline", "err", err)
		}
		rc := &reqCtx{w: w, r: r, id: id, op: name}
		resp, err := h(rc)
		result := "ok"
		if err != nil {
			result = "error"
			var he *httpError
			if errors.As(err, &he) && he.code == http.StatusForbidden {
				result = "denied"
			}
		}
		d.metrics.requests.WithLabelValues(name, result).Inc()
		if audited {
			e := AuditEntry{UID: id.UID, User: id.User, Role: id.Role, Op: name, Target: r.URL.Path, Result: "ok"}
			if a, ok := resp.(auditable); ok {
				e.Target, e.KeyIDs = a.audit()
			}
			if a, ok := resp.(interface{ auditOp() string }); ok && a.auditOp() != "" {
				e.Op = a.auditOp() // vm.encrypt.abort, say
			}
			if err != nil {
				e.Result, e.Detail = "error", err.Error()
				var he *httpError
				if errors.As(err, &he) && he.code == http.StatusForbidden {
					e.Result = "denied"
				}
			}
			d.auditWrite(e)
		}
		if err != nil {
			code := http.StatusInternalServerError
			var he *httpError
			if errors.As(err, &he) {
				code = he.code
			}
			kind := errorKind(err)
			if rc.streaming {
				rc.enc.Encode(api.StreamLine{Error: err.Error(), Code: code, Kind: kind})
				return
			}
			writeJSON(w, code, api.Error{Error: err.Error(), Kind: kind})
			return
		}
		if rc.streaming {
			raw, _ := json.Marshal(resp)
			rc.enc.Encode(api.StreamLine{Result: raw})
			return
		}
		writeJSON(w, http.StatusOK, resp)
	})
}

// errorKind says what a failed request's error is about (api.ErrorKind),
// so a client can act on it without parsing the message.
func errorKind(err error) api.ErrorKind {
	var he *httpError
	switch {
	case errors.As(err, &he) && he.code == http.StatusForbidden:
		return api.KindDenied
	case errors.Is(err, vm.ErrConversionInterrupted):
		return api.KindInterrupted
	case errors.Is(err, vm.ErrRefused):
		return api.KindRefused
	case errors.Is(err, keys.ErrKeyUnavailable):
		return api.KindKeyUnavailable
	}
	return ""
}

// auditable responses name their target and key ids for the audit log.
type auditable interface {
	audit() (target string, keyIDs []string)
}

func (d *Daemon) auditWrite(e AuditEntry) {
	if err := d.audit.write(e); err != nil {
		d.log.Error("audit log write failed", "err", err)
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// decode reads a JSON body strictly: unknown fields, trailing data and
// oversized bodies are 400.
func decode(rc *reqCtx, v any) error {
	dec := json.NewDecoder(rc.r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return badRequest("request body larger than %d bytes", api.MaxRequestBytes)
		}
		return badRequest("bad request body: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return badRequest("bad request body: trailing data")
	}
	return nil
}

func (d *Daemon) hStatus(rc *reqCtx) (any, error) { return d.status(rc.id), nil }

func (d *Daemon) hHostStatus(rc *reqCtx) (any, error) { return d.status(rc.id).HostEncryption, nil }

type hostResult struct {
	api.HostEncryption
}

func (h hostResult) audit() (string, []string) {
	if h.KeyID == "" {
		return "host", nil
	}
	return "host", []string{h.Provider + "/" + h.KeyID}
}

func (d *Daemon) hHostSet(rc *reqCtx) (any, error) {
	var req api.HostEncryptionRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(rc.r.Context(), time.Minute)
	defer cancel()
	if req.Enable {
		if err := d.managerReady(ctx); err != nil {
			return nil, err
		}
	}
	d.mu.Lock()
	cur := d.st.HostKey
	provider := req.Provider
	if provider == "" {
		provider = d.defaultProvider()
	}
	d.mu.Unlock()
	if req.Enable {
		if cur != nil {
			return hostResult{d.status(rc.id).HostEncryption}, nil // already on: idempotent
		}
		if provider == "" {
			return nil, badRequest("no key provider: add one with 'vmcryptd kms add' or name one")
		}
		host, _ := os.Hostname()
		kek, err := d.keyring.Create(ctx, provider, "vmcryptd-host-"+host)
		if err != nil {
			return nil, err
		}
		d.mu.Lock()
		d.st.HostKey = &keyRefJSON{Provider: kek.Ref.Provider, KeyID: kek.Ref.KeyID}
		err = d.st.save(d.statePath())
		if err != nil {
			d.st.HostKey = nil
		}
		d.mu.Unlock()
		if err != nil {
			return nil, err
		}
		d.log.Info("host encryption mode enabled", "key", kek.Ref.String())
		if d.mgr != nil {
			d.heartbeat(ctx) // the manager shows the mode now, not at the next hello
		}
		return hostResult{d.status(rc.id).HostEncryption}, nil
	}
	if cur == nil {
		return hostResult{}, nil
	}
	d.mu.Lock()
	if n := len(d.st.VMs); n > 0 {
		d.mu.Unlock()
		return nil, conflict("host encryption mode cannot be disabled: %d encrypted VM(s) are registered", n)
	}
	d.st.HostKey = nil
	err := d.st.save(d.statePath())
	if err != nil {
		d.st.HostKey = cur
	}
	d.mu.Unlock()
	if err != nil {
		return nil, err
	}
	ref := keys.KeyRef{Provider: cur.Provider, KeyID: cur.KeyID}
	d.keyring.Forget(ref)
	d.log.Info("host encryption mode disabled", "key", ref.String())
	if d.mgr != nil {
		d.heartbeat(ctx)
	}
	return hostResult{api.HostEncryption{Provider: cur.Provider, KeyID: cur.KeyID}}, nil
}

// RequireHostEncryption is the check every encrypted-VM operation makes.
func (d *Daemon) requireHostEncryption() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.st.HostKey == nil {
		return conflict("host encryption mode is disabled: enable it with 'vmcryptd host encryption enable'")
	}
	return nil
}

func (d *Daemon) hKMSList(rc *reqCtx) (any, error) { return d.status(rc.id).Providers, nil }

type kmsResult struct {
	api.ProviderInfo
}

func (k kmsResult) audit() (string, []string) { return "kms/" + k.Name, nil }

func (d *Daemon) hKMSAdd(rc *reqCtx) (any, error) {
	var req api.ProviderAdd
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	if strings.TrimSpace(req.Name) == "" || strings.ContainsAny(req.Name, "/\n") {
		return nil, badRequest("provider name must be non-empty and contain no '/' or newline")
	}
	kc := kms.Config{Name: req.Name, Servers: req.Servers, CAFile: req.CAFile, CertFile: req.CertFile, KeyFile: req.KeyFile,
		TLSCipherSuites: req.TLSCipherSuites}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, dup := d.providers[req.Name]; dup {
		return nil, conflict("key provider %q already exists", req.Name)
	}
	if err := d.addProviderLocked(kc, "api"); err != nil {
		return nil, badRequest("%v", err)
	}
	d.st.Providers = append(d.st.Providers, kc)
	prevDefault := d.st.DefaultProvider
	if req.Default || d.defaultProvider() == "" {
		d.st.DefaultProvider = req.Name
	}
	if err := d.st.save(d.statePath()); err != nil {
		d.st.Providers = d.st.Providers[:len(d.st.Providers)-1]
		d.st.DefaultProvider = prevDefault
		d.providers[req.Name].Close()
		delete(d.providers, req.Name)
		delete(d.source, req.Name)
		d.keyring.SetProvider(req.Name, nil)
		return nil, err
	}
	return kmsResult{api.ProviderInfo{Name: req.Name, Servers: d.providers[req.Name].Servers(),
		Default: d.defaultProvider() == req.Name, Source: "api"}}, nil
}

func (d *Daemon) hKMSRemove(rc *reqCtx) (any, error) {
	name := rc.r.PathValue("name")
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.providers[name]
	if !ok {
		return nil, notFound("no key provider %q", name)
	}
	if d.source[name] == "config" {
		return nil, conflict("key provider %q comes from the config file; remove it there", name)
	}
	if h := d.st.HostKey; h != nil && h.Provider == name {
		return nil, conflict("key provider %q holds the host key; disable host encryption mode first", name)
	}
	for _, vm := range d.st.VMs {
		for _, k := range vm.Keys {
			if k.Provider == name {
				return nil, conflict("key provider %q holds keys of VM %s", name, vm.Dir)
			}
		}
	}
	var kept []kms.Config
	for _, kc := range d.st.Providers {
		if kc.Name != name {
			kept = append(kept, kc)
		}
	}
	old := d.st.Providers
	oldDefault := d.st.DefaultProvider
	d.st.Providers = kept
	if d.st.DefaultProvider == name {
		d.st.DefaultProvider = ""
	}
	if err := d.st.save(d.statePath()); err != nil {
		d.st.Providers, d.st.DefaultProvider = old, oldDefault
		return nil, err
	}
	p.Close()
	delete(d.providers, name)
	delete(d.source, name)
	d.keyring.SetProvider(name, nil)
	return kmsResult{api.ProviderInfo{Name: name}}, nil
}

func (d *Daemon) hKMSStatus(rc *reqCtx) (any, error) {
	name := rc.r.PathValue("name")
	d.mu.Lock()
	p, ok := d.providers[name]
	d.mu.Unlock()
	if !ok {
		return nil, notFound("no key provider %q", name)
	}
	ctx, cancel := context.WithTimeout(rc.r.Context(), 30*time.Second)
	defer cancel()
	return api.ProviderStatus{Name: name, Servers: p.Status(ctx)}, nil
}

// KeyCreateRequest is POST /v1/keys.
type keyCreateRequest struct {
	Provider string `json:"provider"`
	Name     string `json:"name"`
}

type keyCreateResult struct {
	Provider string `json:"provider"`
	KeyID    string `json:"key_id"`
}

func (k keyCreateResult) audit() (string, []string) {
	return "kms/" + k.Provider, []string{k.Provider + "/" + k.KeyID}
}

func (d *Daemon) hKeyCreate(rc *reqCtx) (any, error) {
	var req keyCreateRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	if err := d.managerReady(rc.r.Context()); err != nil {
		return nil, err
	}
	d.mu.Lock()
	if req.Provider == "" {
		req.Provider = d.defaultProvider()
	}
	d.mu.Unlock()
	if req.Name == "" {
		req.Name = "vmcryptd-key"
	}
	ctx, cancel := context.WithTimeout(rc.r.Context(), time.Minute)
	defer cancel()
	kek, err := d.keyring.Create(ctx, req.Provider, req.Name)
	if err != nil {
		return nil, err
	}
	return keyCreateResult{Provider: kek.Ref.Provider, KeyID: kek.Ref.KeyID}, nil
}

package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/config"
)

// vmLocks serialises operations on one VM directory.
type vmLocks struct {
	mu   sync.Mutex
	busy map[string]string // dir -> operation in progress
}

func (l *vmLocks) acquire(dir, op string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.busy == nil {
		l.busy = map[string]string{}
	}
	if cur, ok := l.busy[dir]; ok {
		return conflict("%s: %s already in progress", dir, cur)
	}
	l.busy[dir] = op
	return nil
}

// isBusy reports whether p is a VM directory under an operation, a path
// inside one, or a directory holding one (whose rename would move it
// from under the operation).
func (l *vmLocks) isBusy(p string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for dir := range l.busy {
		if p == dir || strings.HasPrefix(p, dir+"/") || strings.HasPrefix(dir, p+"/") {
			return true
		}
	}
	return false
}

// acquireVM registers op on the VM directory dir (from vmDir) after
// checking, under servedMu shared, that dir is still inside the running
// configuration's datastores: a reload that dropped its datastore since
// vmDir checked it is seen here, and a reload after this sees the lock.
func (d *Daemon) acquireVM(dir, op string) error {
	d.servedMu.RLock()
	defer d.servedMu.RUnlock()
	if !insideDatastores(d.config(), dir) {
		return conflict("%s: no longer inside a configured datastore (the configuration was reloaded while the request waited)", dir)
	}
	return d.vmLocks.acquire(dir, op)
}

// insideDatastores reports whether the resolved path dir lies strictly
// inside one of cfg's datastores (any path, when none is configured). dir
// need not exist yet (vm create).
func insideDatastores(cfg *config.Config, dir string) bool {
	if len(cfg.Datastores) == 0 {
		return true
	}
	for _, ds := range cfg.Datastores {
		root, err := filepath.EvalSymlinks(ds.Path)
		if err != nil {
			continue
		}
		if rel, err := filepath.Rel(root, dir); err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../") {
			return true
		}
	}
	return false
}

func (l *vmLocks) release(dir string) {
	l.mu.Lock()
	delete(l.busy, dir)
	l.mu.Unlock()
}

// vmDir validates a VM directory from a request: absolute, existing, and
// inside a configured datastore (when any is configured), after resolving
// symlinks, so the daemon never converts files outside its datastores.
func (d *Daemon) vmDir(p string) (string, error) {
	if p == "" || !filepath.IsAbs(p) {
		return "", badRequest("VM directory must be an absolute path, got %q", p)
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", badRequest("VM directory %s: %v", p, err)
	}
	if st, err := os.Stat(real); err != nil || !st.IsDir() {
		return "", badRequest("%s is not a directory", p)
	}
	cfg := d.config()
	if len(cfg.Datastores) == 0 {
		return real, nil
	}
	for _, ds := range cfg.Datastores {
		root, err := filepath.EvalSymlinks(ds.Path)
		if err != nil {
			continue
		}
		if rel, err := filepath.Rel(root, real); err == nil && rel != "." && !strings.HasPrefix(rel, "..") {
			return real, nil
		}
	}
	return "", badRequest("%s is not inside a configured datastore", p)
}

func (d *Daemon) vmOps(emit func(any)) *vmops.VMOps {
	ops := &vmops.VMOps{Keys: d.keyring, Log: d.log, CoreDumpPatterns: d.config().CoreDumpPatterns}
	d.mu.Lock()
	if h := d.st.HostKey; h != nil {
		ops.HostKEK = &keys.KeyRef{Provider: h.Provider, KeyID: h.KeyID}
	}
	d.mu.Unlock()
	if emit != nil {
		var last time.Time
		var prev int64
		ops.Progress = func(ev vmops.ProgressEvent) {
			if ev.Done > prev {
				d.metrics.converted.WithLabelValues(string(ev.Op)).Add(float64(ev.Done - prev))
				prev = ev.Done
			}
			// A line per 100 ms keeps the stream light on fast disks.
			if now := time.Now(); now.Sub(last) >= 100*time.Millisecond || ev.Done == ev.Total {
				last = now
				emit(wireProgress(ev))
			}
		}
	}
	return ops
}

// vmResult is what VM operations answer; it names the VM and its keys for
// the audit log.
type vmResult struct {
	vm.VMStatus
	op string // audited operation name, when not the route's (an abort)
}

func (v vmResult) audit() (string, []string) { return v.Dir, v.KEKs }

func (v vmResult) auditOp() string { return v.op }

// registerVM records an encrypted VM (or forgets a decrypted one) in the
// state so its KEKs are fetched again after a restart.
//
// With the manager as key source the VM is then registered there too (or
// unregistered): a refusal is returned; an unreachable manager is not,
// the key loop registers the VM once the manager answers.
//
// policy is the storage policy `policy set` put the VM under (manager
// mode); empty keeps the recorded one.
func (d *Daemon) registerVM(st *vm.VMStatus, policy string) error {
	prev, err := d.registerLocal(st, policy)
	if err != nil || d.mgr == nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if st.Encrypted {
		return d.managerRegister(ctx, st.Dir)
	}
	if prev != nil && prev.VMID != "" {
		return d.managerUnregister(ctx, prev.VMID)
	}
	return nil
}

// registerLocal updates the state; it returns the record st.Dir had.
// The record keeps its storage policy (manager mode) unless policy names
// another or the VM is no longer the same one.
func (d *Daemon) registerLocal(st *vm.VMStatus, policy string) (*vmRecord, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var kept []vmRecord
	var prev *vmRecord
	for _, vm := range d.st.VMs {
		if vm.Dir != st.Dir {
			kept = append(kept, vm)
		} else {
			prev = &vm
		}
	}
	if st.Encrypted {
		rec := vmRecord{Dir: st.Dir, Name: st.Name, VMID: st.VMID, Policy: policy}
		if policy == "" && prev != nil && prev.VMID == st.VMID {
			rec.Policy = prev.Policy
		}
		for _, r := range vm.KEKRefs(st.KEKs) {
			rec.Keys = append(rec.Keys, keyRefJSON{Provider: r.Provider, KeyID: r.KeyID})
		}
		kept = append(kept, rec)
	}
	old := d.st.VMs
	d.st.VMs = kept
	if err := d.st.save(d.statePath()); err != nil {
		d.st.VMs = old
		return nil, err
	}
	return prev, nil
}

// kekFor picks the KEK of an encryption: a named existing key, or a new
// key on the provider (vCenter likewise asks the KMS for a fresh key).
func (d *Daemon) kekFor(ctx context.Context, req api.VMRequest, name string) (keys.KeyRef, error) {
	if err := d.managerReady(ctx); err != nil {
		return keys.KeyRef{}, err
	}
	d.mu.Lock()
	provider := req.Provider
	if provider == "" {
		provider = d.defaultProvider()
	}
	d.mu.Unlock()
	if provider == "" {
		return keys.KeyRef{}, badRequest("no key provider configured")
	}
	if req.KeyID != "" {
		ref := keys.KeyRef{Provider: provider, KeyID: req.KeyID}
		if _, err := d.keyring.Get(ctx, ref); err != nil {
			return keys.KeyRef{}, err
		}
		return ref, nil
	}
	kek, err := d.keyring.Create(ctx, provider, "vmcryptd-vm-"+name)
	if err != nil {
		return keys.KeyRef{}, err
	}
	return kek.Ref, nil
}

// vmOp is the common frame of the converting operations.
func (d *Daemon) vmOp(rc *reqCtx, needHostMode bool, run func(ctx context.Context, dir string, req api.VMRequest, ops *vmops.VMOps) error) (any, error) {
	return d.vmOpPolicy(rc, needHostMode, nil, run)
}

// vmOpPolicy is vmOp that, when policy is set, records *policy (as run
// left it) as the VM's storage policy on registration.
func (d *Daemon) vmOpPolicy(rc *reqCtx, needHostMode bool, policy *string, run func(ctx context.Context, dir string, req api.VMRequest, ops *vmops.VMOps) error) (any, error) {
	var req api.VMRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	dir, err := d.vmDir(req.Dir)
	if err != nil {
		return nil, err
	}
	if needHostMode {
		if err := d.requireHostEncryption(); err != nil {
			return nil, err
		}
	}
	if err := d.acquireVM(dir, rc.op); err != nil {
		return nil, err
	}
	defer d.vmLocks.release(dir)
	d.ops.Add(1)
	defer d.ops.Done()
	// Converting files under a running VM would pull them from under it.
	if rc.op != "vm.rekey" || req.Deep || req.Abort {
		if open := d.openFilesUnder(dir); len(open) > 0 {
			return nil, conflict("%s is in use: open through a decrypted view: %s", dir, strings.Join(open, ", "))
		}
	}
	defer d.forgetDEKs(dir)
	// The conversion outlives a client that disconnects: it runs to the
	// end (or to the daemon's shutdown), and re-running resumes it anyway.
	ctx := context.WithoutCancel(rc.r.Context())
	emit := rc.stream()
	err = run(ctx, dir, req, d.vmOps(emit))
	st, serr := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns)
	if serr != nil {
		if err == nil {
			err = serr
		}
		return nil, err
	}
	pol := ""
	if policy != nil && err == nil {
		pol = *policy
	}
	if rerr := d.registerVM(st, pol); rerr != nil && err == nil {
		err = rerr
	}
	if p := d.managedPolicy(dir, st); p != "" {
		st.Policy = p
	}
	res := vmResult{VMStatus: *st}
	if req.Abort {
		res.op = rc.op + ".abort"
	}
	if err != nil {
		return res, err
	}
	return res, nil
}

func (d *Daemon) hVMEncrypt(rc *reqCtx) (any, error) {
	return d.vmOp(rc, true, func(ctx context.Context, dir string, req api.VMRequest, ops *vmops.VMOps) error {
		if req.Abort {
			return ops.Abort(ctx, dir, vm.OpEncrypt)
		}
		var kek keys.KeyRef
		if op, err := vm.InterruptedOp(dir); err != nil {
			return err
		} else if op == "" { // a resumed encryption already has its keys
			// Refuse before a new KEK is made on the key server.
			if err := ops.CheckEncrypt(ctx, dir); err != nil {
				return err
			}
			var err error
			if kek, err = d.kekFor(ctx, req, filepath.Base(dir)); err != nil {
				return err
			}
		}
		return ops.Encrypt(ctx, dir, kek)
	})
}

func (d *Daemon) hVMDecrypt(rc *reqCtx) (any, error) {
	return d.vmOp(rc, false, func(ctx context.Context, dir string, req api.VMRequest, ops *vmops.VMOps) error {
		if req.Abort {
			return ops.Abort(ctx, dir, vm.OpDecrypt)
		}
		return ops.Decrypt(ctx, dir)
	})
}

func (d *Daemon) hVMRekey(rc *reqCtx) (any, error) {
	return d.vmOp(rc, true, func(ctx context.Context, dir string, req api.VMRequest, ops *vmops.VMOps) error {
		if req.Abort {
			// Only a deep rekey converts data; a shallow one rewrites
			// keySafes one by one and has nothing to roll back.
			return ops.Abort(ctx, dir, vm.OpRekeyDeep)
		}
		if req.Deep {
			var kek keys.KeyRef
			if op, err := vm.InterruptedOp(dir); err != nil {
				return err
			} else if op == "" {
				cur, err := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns)
				if err != nil {
					return err
				}
				// Deep rekey keeps the current KEK unless another is named.
				refs := vm.KEKRefs(cur.KEKs)
				if req.KeyID == "" && req.Provider == "" && len(refs) > 0 {
					kek = refs[0]
				} else if kek, err = d.kekFor(ctx, req, filepath.Base(dir)); err != nil {
					return err
				}
			}
			return ops.RekeyDeep(ctx, dir, kek)
		}
		kek, err := d.kekFor(ctx, req, filepath.Base(dir))
		if err != nil {
			return err
		}
		return ops.RekeyShallow(ctx, dir, kek)
	})
}

func (d *Daemon) hVMPolicy(rc *reqCtx) (any, error) {
	if d.mgr != nil {
		return d.hVMPolicyManaged(rc) // the manager's policies (mgrpolicy.go)
	}
	return d.vmOp(rc, false, func(ctx context.Context, dir string, req api.VMRequest, ops *vmops.VMOps) error {
		cur, err := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns)
		if err != nil {
			return err
		}
		switch req.Policy {
		case vm.PolicyEncrypt:
			if !d.auth.allowed(rc.id, PrivEncrypt) {
				return &httpError{403, fmt.Sprintf("permission denied: this policy encrypts the VM, which needs privilege %s", PrivEncrypt)}
			}
			if err := d.requireHostEncryption(); err != nil {
				return err
			}
			if cur.Encrypted && cur.Interrupted == "" {
				return nil
			}
			var kek keys.KeyRef
			if cur.Interrupted == "" {
				if kek, err = d.kekFor(ctx, req, filepath.Base(dir)); err != nil {
					return err
				}
			}
			return ops.Encrypt(ctx, dir, kek)
		case vm.PolicyDefault:
			if !d.auth.allowed(rc.id, PrivDecrypt) {
				return &httpError{403, fmt.Sprintf("permission denied: this policy decrypts the VM, which needs privilege %s", PrivDecrypt)}
			}
			if !cur.Encrypted && cur.Interrupted == "" {
				return nil
			}
			return ops.Decrypt(ctx, dir)
		default:
			return badRequest("unknown policy %q (known: %q, %q)", req.Policy, vm.PolicyEncrypt, vm.PolicyDefault)
		}
	})
}

func (d *Daemon) hVMStatus(rc *reqCtx) (any, error) {
	dir, err := d.vmDir(rc.r.URL.Query().Get("dir"))
	if err != nil {
		return nil, err
	}
	st, err := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	locked, reason := false, ""
	for _, r := range vm.KEKRefs(st.KEKs) {
		if !d.keyring.Cached(r) {
			locked = true
			d.mu.Lock()
			reason = d.keyErrs[r]
			d.mu.Unlock()
			if reason == "" {
				reason = "key " + r.String() + " not loaded"
			}
		}
	}
	if !locked {
		// With the keys in memory, status also authenticates the headers
		// (vm check without --repair): a degraded container, one whose
		// slots differ or one under the wrong key shows up here too.
		if rep, err := d.vmOps(nil).Check(context.WithoutCancel(rc.r.Context()), dir, false); err == nil {
			for _, f := range rep.Findings {
				if line := wireFinding(f).String(); f.File != "" && !slices.Contains(st.Problems, line) {
					st.Problems = append(st.Problems, line)
				}
			}
		}
	}
	if p := d.managedPolicy(dir, st); p != "" {
		st.Policy = p
	}
	return api.VMStatusReply{VMStatus: wireVMStatus(st), Locked: locked, LockReason: reason,
		Warning: revokedWarning(d.keyring, vm.KEKRefs(st.KEKs))}, nil
}

func (d *Daemon) hPolicyList(rc *reqCtx) (any, error) {
	if d.mgr != nil {
		return d.managerPolicies(rc.r.Context())
	}
	return []api.Policy{
		{Name: vm.PolicyEncrypt, Encrypts: true, Description: "VM files and disks encrypted at rest (XTS-AES-256 under per-VM and per-disk keys)"},
		{Name: vm.PolicyDefault, Encrypts: false, Description: "no encryption"},
	}, nil
}

// diskRequest decodes a disk request and validates its VM directory.
func (d *Daemon) diskRequest(rc *reqCtx) (api.DiskRequest, string, error) {
	var req api.DiskRequest
	if err := decode(rc, &req); err != nil {
		return req, "", err
	}
	dir, err := d.vmDir(req.Dir)
	return req, dir, err
}

type diskResult struct {
	api.DiskReply
	dir string
}

func (r diskResult) audit() (string, []string) { return r.dir + "/" + r.Name, nil }

func (d *Daemon) hDiskAdd(rc *reqCtx) (any, error) {
	req, dir, err := d.diskRequest(rc)
	if err != nil {
		return nil, err
	}
	st, err := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	// A disk for an encrypted VM is a cryptographic operation.
	if st.Encrypted {
		if !d.auth.allowed(rc.id, PrivAddDisk) {
			return nil, &httpError{403, fmt.Sprintf("permission denied: adding a disk to an encrypted VM needs privilege %s", PrivAddDisk)}
		}
		if err := d.requireHostEncryption(); err != nil {
			return nil, err
		}
	}
	if err := d.acquireVM(dir, rc.op); err != nil {
		return nil, err
	}
	defer d.vmLocks.release(dir)
	// Re-check under the lock: the VM may have been encrypted meanwhile.
	if st2, err := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns); err != nil || st2.Encrypted != st.Encrypted {
		return nil, conflict("%s changed while the request waited; try again", dir)
	}
	name, err := d.vmOps(nil).AddDisk(context.WithoutCancel(rc.r.Context()), dir, vmops.DiskSpec{Size: req.Size, Subformat: req.Subformat})
	if err != nil {
		return nil, badRequest("%v", err)
	}
	return diskResult{api.DiskReply{Name: name, Encrypted: st.Encrypted}, dir}, nil
}

func (d *Daemon) hDiskAttach(rc *reqCtx) (any, error) {
	req, dir, err := d.diskRequest(rc)
	if err != nil {
		return nil, err
	}
	if err := d.acquireVM(dir, rc.op); err != nil {
		return nil, err
	}
	defer d.vmLocks.release(dir)
	enc, err := d.vmOps(nil).AttachDisk(rc.r.Context(), dir, req.Path, d.auth.allowed(rc.id, PrivAddDisk))
	if errors.Is(err, vmops.ErrAttachEncrypted) {
		return nil, &httpError{403, fmt.Sprintf("permission denied: %v; it needs privilege %s", err, PrivAddDisk)}
	}
	if err != nil {
		return nil, conflict("%v", err)
	}
	return diskResult{api.DiskReply{Name: filepath.Base(req.Path), Encrypted: enc}, dir}, nil
}

// hDiskRestoreKeys writes back a disk's lost key lines from its extents'
// keySafe copy (vmops.VMOps.RestoreDiskKeys): a cryptographic act, never
// done without being asked.
func (d *Daemon) hDiskRestoreKeys(rc *reqCtx) (any, error) {
	req, dir, err := d.diskRequest(rc)
	if err != nil {
		return nil, err
	}
	if err := d.requireHostEncryption(); err != nil {
		return nil, err
	}
	if err := d.acquireVM(dir, rc.op); err != nil {
		return nil, err
	}
	defer d.vmLocks.release(dir)
	defer d.forgetDEKs(dir)
	id, err := d.vmOps(nil).RestoreDiskKeys(context.WithoutCancel(rc.r.Context()), dir, req.Path)
	if err != nil {
		return nil, conflict("%v", err)
	}
	return diskResult{api.DiskReply{Name: filepath.Base(req.Path), Encrypted: true, DiskID: id}, dir}, nil
}

func (d *Daemon) hVMCreate(rc *reqCtx) (any, error) {
	var req api.CreateRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	if req.Dir == "" || !filepath.IsAbs(req.Dir) {
		return nil, badRequest("VM directory must be an absolute path")
	}
	parent, err := d.vmDir(filepath.Dir(req.Dir))
	if err != nil && len(d.config().Datastores) > 0 {
		// The parent may be a datastore root itself.
		parent, err = datastoreRoot(d.config(), filepath.Dir(req.Dir))
	}
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(parent, filepath.Base(req.Dir))
	spec := vmops.CreateSpec{Name: req.Name, Memory: req.Memory, Encrypt: req.Encrypt}
	for _, ds := range req.Disks {
		spec.Disks = append(spec.Disks, vmops.DiskSpec{Size: ds.Size, Subformat: ds.Subformat})
	}
	if req.Encrypt {
		if !d.auth.allowed(rc.id, PrivEncryptNew) {
			return nil, &httpError{403, fmt.Sprintf("permission denied: creating an encrypted VM needs privilege %s", PrivEncryptNew)}
		}
		if err := d.requireHostEncryption(); err != nil {
			return nil, err
		}
		kek, err := d.kekFor(rc.r.Context(), api.VMRequest{Provider: req.Provider}, req.Name)
		if err != nil {
			return nil, err
		}
		spec.KEK = kek
	}
	if err := d.acquireVM(dir, rc.op); err != nil {
		return nil, err
	}
	defer d.vmLocks.release(dir)
	if err := d.vmOps(nil).Create(context.WithoutCancel(rc.r.Context()), dir, spec); err != nil {
		return nil, badRequest("%v", err)
	}
	st, err := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns)
	if err != nil {
		return nil, err
	}
	if err := d.registerVM(st, ""); err != nil {
		return nil, err
	}
	return vmResult{VMStatus: *st}, nil
}

// datastoreRoot accepts p when it is exactly a datastore of cfg.
func datastoreRoot(cfg *config.Config, p string) (string, error) {
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", badRequest("%s: %v", p, err)
	}
	for _, ds := range cfg.Datastores {
		if root, err := filepath.EvalSymlinks(ds.Path); err == nil && root == real {
			return real, nil
		}
	}
	return "", badRequest("%s is not inside a configured datastore", p)
}

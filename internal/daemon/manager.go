package daemon

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

// mgrState is what the daemon knows of its manager (manager mode only).
type mgrState struct {
	mgrMu sync.Mutex
	// mgrOK is the time of the last answered request; mgrErr the error
	// of the last request that got no answer ("" after an answer).
	mgrOK  time.Time
	mgrErr string
	// mgrSynced are the VM dirs whose registration the manager answered
	// (accepted or refused) since this daemon started; the others are
	// (re)sent by the key loop.
	mgrSynced map[string]bool
	// mgrDenied are keys the manager refused to this host, and when: the
	// key loop asks for them again only after deniedBackoff (each ask is
	// an audited denial at the manager); vm register asks at once.
	mgrDenied map[keys.KeyRef]time.Time
	// mgrLocked is set while the manager holds this host locked
	// (`vmcryptd manager host lock`), with the manager's reason;
	// localLocked while `vmcryptd lock` is in force. The keys come back
	// only when neither is.
	mgrLocked     bool
	mgrLockReason string
	localLocked   bool
}

// deniedBackoff is how long the key loop leaves a refused key alone.
const deniedBackoff = 5 * time.Minute

func (d *Daemon) deniedRecently(ref keys.KeyRef) bool {
	if d.mgr == nil {
		return false
	}
	d.mgrMu.Lock()
	defer d.mgrMu.Unlock()
	at, ok := d.mgrDenied[ref]
	return ok && time.Since(at) < deniedBackoff
}

// noteDenied records (or clears) a manager refusal of ref.
func (d *Daemon) noteDenied(ref keys.KeyRef, err error) {
	if d.mgr == nil {
		return
	}
	var re *mgrproto.RefusedError
	d.mgrMu.Lock()
	defer d.mgrMu.Unlock()
	if errors.As(err, &re) && re.Code == mgrproto.CodeDenied {
		d.mgrDenied[ref] = time.Now()
	} else {
		delete(d.mgrDenied, ref)
	}
}

// useManager makes the manager the key source: every provider name is
// served through it (keys.Keyring.SetResolver).
func (d *Daemon) useManager(c mgrproto.Config) error {
	cl, err := mgrproto.NewClient(c)
	if err != nil {
		return err
	}
	d.mgr = cl
	d.mgrSynced = map[string]bool{}
	d.mgrDenied = map[keys.KeyRef]time.Time{}
	d.keyring.SetResolver(func(provider string) keys.KeyServer {
		return mgrKeyServer{d: d, ks: mgrproto.KeyServer{C: cl, Provider: provider}}
	})
	return nil
}

// mgrKeyServer notes every answer and non-answer of the manager, so
// status shows whether it is reachable.
type mgrKeyServer struct {
	d  *Daemon
	ks mgrproto.KeyServer
}

func (k mgrKeyServer) CreateKey(ctx context.Context, name string) (string, error) {
	id, err := k.ks.CreateKey(ctx, name)
	k.d.noteManager(err)
	return id, err
}

func (k mgrKeyServer) GetKey(ctx context.Context, id string) ([]byte, error) {
	raw, err := k.ks.GetKey(ctx, id)
	k.d.noteManager(err)
	return raw, err
}

func (k mgrKeyServer) FetchKEK(ctx context.Context, id string) ([]byte, string, error) {
	raw, state, err := k.ks.FetchKEK(ctx, id)
	k.d.noteManager(err)
	return raw, state, err
}

// noteManager records whether a request reached the manager.
func (d *Daemon) noteManager(err error) {
	var ue *mgrproto.UnreachableError
	d.mgrMu.Lock()
	defer d.mgrMu.Unlock()
	if errors.As(err, &ue) {
		d.mgrErr = err.Error()
		return
	}
	d.mgrOK, d.mgrErr = time.Now(), ""
}

// managerReady makes sure the manager's default provider is known (one
// hello), for operations that make a key on "the default provider". A
// no-op for trusted hosts.
func (d *Daemon) managerReady(ctx context.Context) error {
	if d.mgr == nil || d.mgr.LastHello().Host != "" {
		return nil
	}
	return d.heartbeat(ctx)
}

// heartbeat says hello: the host's encryption mode and the keys it holds.
func (d *Daemon) heartbeat(ctx context.Context) error {
	st := mgrproto.HostStatus{Version: d.version}
	d.mu.Lock()
	if h := d.st.HostKey; h != nil {
		st.HostKey = &mgrproto.KeyRef{Provider: h.Provider, KeyID: h.KeyID}
	}
	d.mu.Unlock()
	for _, r := range d.keyring.Refs() {
		if len(st.Held) < mgrproto.MaxHeld {
			st.Held = append(st.Held, mgrproto.KeyRef{Provider: r.Provider, KeyID: r.KeyID})
		}
	}
	r, err := d.mgr.Hello(ctx, st)
	d.noteManager(err)
	if err != nil {
		d.log.Warn("manager hello failed", "err", err)
		return err
	}
	if r.Locked != d.managerLocked() {
		d.applyManagerLock(ctx, r.Locked, r.LockReason)
	}
	return nil
}

// managerLocked reports whether the manager holds this host locked.
func (d *Daemon) managerLocked() bool {
	d.mgrMu.Lock()
	defer d.mgrMu.Unlock()
	return d.mgrLocked
}

// applyManagerLock brings the host to the manager's lock state: locked,
// every key is zeroed as by `vmcryptd lock`; unlocked, the keys are
// fetched again unless `vmcryptd lock` is also in force. It reports
// whether the host is now in that state (a lock waits for a running VM
// operation, which holds its own key copies, to end).
func (d *Daemon) applyManagerLock(ctx context.Context, locked bool, reason string) bool {
	if !locked {
		d.mgrMu.Lock()
		was, local := d.mgrLocked, d.localLocked
		d.mgrLocked, d.mgrLockReason = false, ""
		d.mgrMu.Unlock()
		if was && !local {
			uctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			res := d.unlockKeys(uctx)
			cancel()
			d.log.Info("keys unlocked by the manager", "loaded", len(res.Loaded), "failed", len(res.Failed))
		}
		return true
	}
	if d.managerLocked() {
		return true
	}
	if reason == "" {
		reason = "host locked by the manager"
	}
	reason = oneLine(reason)
	res, err := d.lockKeys("the manager", reason, reason, func() {
		d.mgrMu.Lock()
		d.mgrLocked, d.mgrLockReason = true, reason
		d.mgrMu.Unlock()
	})
	if res == nil {
		d.log.Warn("the manager locked this host; waiting for a VM operation to end before zeroing the keys", "err", err)
		return false
	}
	if err != nil {
		d.log.Error("the manager locked this host", "err", err)
	}
	return true
}

// watchManager holds a watch request open at the manager, so a `manager
// host lock` reaches this host at once rather than at the next hello.
func (d *Daemon) watchManager(ctx context.Context) {
	pause := func(dur time.Duration) bool {
		t := time.NewTimer(dur)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		}
	}
	for ctx.Err() == nil {
		locked := d.managerLocked()
		r, err := d.mgr.Watch(ctx, locked)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			d.noteManager(err)
			wait := time.Duration(d.retry.Load())
			var ue *mgrproto.UnreachableError
			if errors.As(err, &ue) && wait > 5*time.Second {
				wait = 5 * time.Second // come back soon after a manager restart
			}
			if !pause(wait) {
				return
			}
			continue
		}
		d.noteManager(nil)
		if r.Locked != locked && !d.applyManagerLock(ctx, r.Locked, r.LockReason) {
			if !pause(time.Second) {
				return
			}
		}
	}
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// managerRegister registers the VM recorded for dir with the manager.
func (d *Daemon) managerRegister(ctx context.Context, dir string) error {
	d.mu.Lock()
	var rec mgrproto.VM
	found := false
	for _, r := range d.st.VMs {
		if r.Dir == dir {
			rec = mgrproto.VM{ID: r.VMID, Name: r.Name, Dir: r.Dir, Policy: r.Policy}
			for _, k := range r.Keys {
				rec.Keys = append(rec.Keys, mgrproto.KeyRef{Provider: k.Provider, KeyID: k.KeyID})
			}
			found = true
		}
	}
	d.mu.Unlock()
	if !found {
		return nil
	}
	if rec.ID == "" {
		return conflict("%s has no %s line: the manager registers VMs by their vmcryptd VM id", dir, vm.VMXVMID)
	}
	err := d.mgr.RegisterVM(ctx, rec)
	d.noteManager(err)
	var ue *mgrproto.UnreachableError
	if errors.As(err, &ue) {
		d.log.Warn("VM not registered with the manager yet; retried by the key loop", "dir", dir, "err", err)
		return nil
	}
	d.mgrMu.Lock()
	d.mgrSynced[dir] = true
	d.mgrMu.Unlock()
	if err != nil {
		return forbidden("register %s with the manager: %v", dir, err)
	}
	return nil
}

func (d *Daemon) managerUnregister(ctx context.Context, vmID string) error {
	err := d.mgr.UnregisterVM(ctx, vmID)
	d.noteManager(err)
	if err != nil {
		return fmt.Errorf("unregister VM %s from the manager: %w", vmID, err)
	}
	return nil
}

// syncRegistrations sends the registrations the manager has not answered
// since start (it may have been down, or this daemon restarted).
func (d *Daemon) syncRegistrations(ctx context.Context) {
	d.mu.Lock()
	var dirs []string
	for _, r := range d.st.VMs {
		dirs = append(dirs, r.Dir)
	}
	d.mu.Unlock()
	for _, dir := range dirs {
		d.mgrMu.Lock()
		done := d.mgrSynced[dir]
		d.mgrMu.Unlock()
		if done || ctx.Err() != nil {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := d.managerRegister(rctx, dir); err != nil {
			d.log.Warn("the manager refused a VM registration", "dir", dir, "err", err)
		}
		cancel()
	}
}

func (d *Daemon) keySource() api.KeySource {
	if d.mgr == nil {
		return api.KeySource{Mode: "direct", Reachable: true}
	}
	d.mgrMu.Lock()
	defer d.mgrMu.Unlock()
	ks := api.KeySource{Mode: "manager", Address: d.mgr.Address(), Host: d.mgr.LastHello().Host, LastOK: d.mgrOK, Error: d.mgrErr,
		LockedByManager: d.mgrLocked, LockReason: d.mgrLockReason}
	ks.Reachable = !d.mgrOK.IsZero() && d.mgrErr == ""
	if d.mgrOK.IsZero() && d.mgrErr == "" {
		ks.Error = "not contacted yet"
	}
	return ks
}

type registerResult struct{ api.VMRegisterReply }

func (r registerResult) audit() (string, []string) { return r.Dir, r.Keys }

// hVMRegister records an encrypted VM (and, with the manager as key
// source, registers it there, which is what entitles this host to its
// keys).
func (d *Daemon) hVMRegister(rc *reqCtx) (any, error) {
	var req api.VMRegisterRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	dir, err := d.vmDir(req.Dir)
	if err != nil {
		return nil, err
	}
	st, err := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns)
	if err != nil {
		return nil, badRequest("%v", err)
	}
	if !st.Encrypted {
		return nil, badRequest("%s is not encrypted: only encrypted VMs are registered", dir)
	}
	res := registerResult{api.VMRegisterReply{Dir: dir, VMID: st.VMID, Keys: st.KEKs, Registered: true}}
	// The manager first: a refused VM is not recorded here either.
	if d.mgr != nil {
		ctx, cancel := context.WithTimeout(rc.r.Context(), 30*time.Second)
		defer cancel()
		if st.VMID == "" {
			return nil, conflict("%s has no %s line: the manager registers VMs by their vmcryptd VM id", dir, vm.VMXVMID)
		}
		rec := mgrproto.VM{ID: st.VMID, Name: st.Name, Dir: dir}
		for _, r := range vm.KEKRefs(st.KEKs) {
			rec.Keys = append(rec.Keys, mgrproto.KeyRef{Provider: r.Provider, KeyID: r.KeyID})
		}
		err := d.mgr.RegisterVM(ctx, rec)
		d.noteManager(err)
		if err != nil {
			return nil, forbidden("register %s with the manager: %v", dir, err)
		}
		d.mgrMu.Lock()
		d.mgrSynced[dir] = true
		d.mgrMu.Unlock()
		res.Manager = "registered"
	}
	if _, err := d.registerLocal(st, ""); err != nil {
		return nil, err
	}
	d.mgrMu.Lock()
	for _, r := range vm.KEKRefs(st.KEKs) {
		delete(d.mgrDenied, r) // entitled now, perhaps: ask at once
	}
	d.mgrMu.Unlock()
	go d.loadKeys(context.WithoutCancel(rc.r.Context()))
	return res, nil
}

// hVMUnregister forgets a VM: it is dropped from the state (and from the
// manager's inventory), and KEKs no other registered VM needs are zeroed.
func (d *Daemon) hVMUnregister(rc *reqCtx) (any, error) {
	var req api.VMRegisterRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	dir := filepath.Clean(req.Dir)
	if real, err := d.vmDir(req.Dir); err == nil {
		dir = real
	}
	if open := d.openFilesUnder(dir); len(open) > 0 {
		return nil, conflict("%s is in use: open through a decrypted view", dir)
	}
	d.mu.Lock()
	var rec *vmRecord
	var kept []vmRecord
	for _, r := range d.st.VMs {
		if r.Dir == dir {
			rec = &r
		} else {
			kept = append(kept, r)
		}
	}
	if rec == nil {
		d.mu.Unlock()
		return nil, notFound("%s is not registered", dir)
	}
	old := d.st.VMs
	d.st.VMs = kept
	if err := d.st.save(d.statePath()); err != nil {
		d.st.VMs = old
		d.mu.Unlock()
		return nil, err
	}
	d.mu.Unlock()
	res := registerResult{api.VMRegisterReply{Dir: dir, VMID: rec.VMID, Keys: []string{}}}
	for _, k := range rec.Keys {
		res.Keys = append(res.Keys, k.Provider+"/"+k.KeyID)
	}
	still := map[keys.KeyRef]bool{}
	for _, r := range d.neededKeys() {
		still[r] = true
	}
	for _, k := range rec.Keys {
		if ref := (keys.KeyRef{Provider: k.Provider, KeyID: k.KeyID}); !still[ref] {
			d.keyring.Forget(ref)
		}
	}
	d.forgetDEKs(dir)
	if d.mgr != nil && rec.VMID != "" {
		ctx, cancel := context.WithTimeout(rc.r.Context(), 30*time.Second)
		defer cancel()
		if err := d.managerUnregister(ctx, rec.VMID); err != nil {
			return nil, err
		}
		res.Manager = "unregistered"
	}
	return res, nil
}

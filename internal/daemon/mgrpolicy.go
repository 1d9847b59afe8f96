package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

// Storage policies with [manager]: the policies are the manager's
// (`vmcryptd manager policy create`), `policy list` lists them and
// `policy set DIR NAME` resolves NAME through the manager first, so a
// manager outage changes nothing. Direct-mode hosts keep the two
// built-in policies of vm.go.

// policyStep is what `policy set` does to a VM to bring it under a
// policy.
type policyStep string

const (
	stepNone    policyStep = "none"    // already as the policy says: only the policy is recorded
	stepEncrypt policyStep = "encrypt" // plain (or an interrupted conversion): encrypt, or resume
	stepRekey   policyStep = "rekey"   // encrypted under another provider: shallow rekey onto the policy's
	stepDecrypt policyStep = "decrypt" // the policy does not encrypt
)

// planPolicy decides the step for a VM in state (encrypted, interrupted
// conversion, providers of its KEKs) put under pol as the manager
// resolved it.
func planPolicy(pol mgrproto.Policy, encrypted bool, interrupted string, kekProviders []string) policyStep {
	if !pol.Encrypts {
		if !encrypted && interrupted == "" {
			return stepNone
		}
		return stepDecrypt
	}
	if !encrypted || interrupted != "" {
		return stepEncrypt
	}
	for _, p := range kekProviders {
		if p != pol.Provider {
			return stepRekey
		}
	}
	return stepNone
}

// policyStepPrivilege is the privilege a step needs beyond the route's
// Cryptographer.ManageEncryptionPolicy ("" for none), as vm encrypt,
// vm rekey and vm decrypt need.
func policyStepPrivilege(s policyStep) Privilege {
	switch s {
	case stepEncrypt:
		return PrivEncrypt
	case stepRekey:
		return PrivRecrypt
	case stepDecrypt:
		return PrivDecrypt
	}
	return ""
}

// managerPolicyError turns a failed manager request of `policy set` or
// `policy list` into the daemon's error: unreachable is 503 (followed by
// suffix), an unknown policy 400, another refusal 403.
func managerPolicyError(what string, err error, suffix string) error {
	var ue *mgrproto.UnreachableError
	var re *mgrproto.RefusedError
	switch {
	case errors.As(err, &ue):
		return &httpError{http.StatusServiceUnavailable, fmt.Sprintf("%s: %v%s", what, err, suffix)}
	case errors.As(err, &re) && re.Code == mgrproto.CodeNotFound:
		return badRequest("%s: %v", what, err)
	case errors.As(err, &re):
		return forbidden("%s: %v", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// hVMPolicyManaged is `policy set DIR NAME` with [manager].
func (d *Daemon) hVMPolicyManaged(rc *reqCtx) (any, error) {
	var recorded string
	return d.vmOpPolicy(rc, false, &recorded, func(ctx context.Context, dir string, req api.VMRequest, ops *vmops.VMOps) error {
		if req.Provider != "" || req.KeyID != "" {
			return badRequest("policy set takes no provider or key id: the manager's policy %q names the provider", req.Policy)
		}
		mctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		pol, err := d.mgr.GetPolicy(mctx, req.Policy)
		cancel()
		d.noteManager(err)
		if err != nil {
			return managerPolicyError(fmt.Sprintf("policy %q for %s", req.Policy, dir), err, " (nothing was changed)")
		}
		cur, err := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns)
		if err != nil {
			return err
		}
		var provs []string
		for _, r := range vm.KEKRefs(cur.KEKs) {
			provs = append(provs, r.Provider)
		}
		step := planPolicy(pol, cur.Encrypted, string(cur.Interrupted), provs)
		if priv := policyStepPrivilege(step); priv != "" && !d.auth.allowed(rc.id, priv) {
			return &httpError{http.StatusForbidden, fmt.Sprintf("permission denied: policy %q needs to %s the VM, which needs privilege %s", pol.Name, step, priv)}
		}
		d.log.Info("policy set", "dir", dir, "policy", pol.Name, "step", string(step), "provider", pol.Provider)
		switch step {
		case stepEncrypt, stepRekey:
			if err := d.requireHostEncryption(); err != nil {
				return err
			}
			var kek keys.KeyRef
			if step == stepRekey || cur.Interrupted == "" {
				if kek, err = d.kekFor(ctx, api.VMRequest{Provider: pol.Provider}, filepath.Base(dir)); err != nil {
					return err
				}
			}
			if step == stepRekey {
				err = ops.RekeyShallow(ctx, dir, kek)
			} else {
				err = ops.Encrypt(ctx, dir, kek)
			}
			if err != nil {
				return err
			}
		case stepDecrypt:
			if err := ops.Decrypt(ctx, dir); err != nil {
				return err
			}
		}
		if pol.Encrypts {
			recorded = pol.Name
		}
		return nil
	})
}

// managerPolicies is `policy list` with [manager].
func (d *Daemon) managerPolicies(ctx context.Context) ([]api.Policy, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	pols, err := d.mgr.ListPolicies(ctx)
	d.noteManager(err)
	if err != nil {
		return nil, managerPolicyError("storage policies", err, "")
	}
	out := make([]api.Policy, 0, len(pols))
	for _, p := range pols {
		out = append(out, api.Policy{Name: p.Name, Encrypts: p.Encrypts, Description: p.Description, Provider: p.Provider, Builtin: p.Builtin, Source: "manager"})
	}
	return out, nil
}

// managedPolicy is the manager policy recorded for the VM in dir (st is
// its status), "" in direct mode or when none was set.
func (d *Daemon) managedPolicy(dir string, st *vm.VMStatus) string {
	if d.mgr == nil || !st.Encrypted {
		return ""
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, r := range d.st.VMs {
		if r.Dir == dir && r.VMID == st.VMID {
			return r.Policy
		}
	}
	return ""
}

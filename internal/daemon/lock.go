package daemon

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

type lockResult struct {
	api.LockResult
	refs []string
}

func (l lockResult) audit() (string, []string) { return "all keys", l.refs }

type unlockResult struct{ api.UnlockResult }

func (u unlockResult) audit() (string, []string) { return "all keys", u.Loaded }

// busyOps lists the VM operations in progress ("dir (op)"), sorted.
// The caller holds l.mu.
func (l *vmLocks) busyOpsLocked() []string {
	var out []string
	for dir, op := range l.busy {
		out = append(out, dir+" ("+op+")")
	}
	sort.Strings(out)
	return out
}

// hLock is `vmcryptd lock`: every KEK and DEK in the daemon is zeroed at
// once, views seal their open encrypted files and drop the kernel's
// cached plaintext, and no key is fetched again until hUnlock. Refused,
// with nothing changed, while a VM operation runs: a conversion holds
// its own copies of keys and must reach its end (it is resumable; stopping
// the daemon also zeroes every key).
func (d *Daemon) hLock(rc *reqCtx) (any, error) {
	reason := fmt.Sprintf("locked by vmcryptd lock (user %s, %s): run vmcryptd unlock", rc.id.User, time.Now().UTC().Format(time.RFC3339))
	res, err := d.lockKeys(rc.id.User, reason, "keys locked by vmcryptd lock: run vmcryptd unlock", func() {
		d.mgrMu.Lock()
		d.localLocked = true
		d.mgrMu.Unlock()
	})
	if res == nil {
		return nil, err
	}
	return *res, err
}

// lockKeys zeroes every KEK and DEK, seals the views and suspends the
// exports; reason is what every VM then reports. marked runs once the
// keyring is locked, before anything else can see it. A nil result
// means nothing was changed (a VM operation runs).
func (d *Daemon) lockKeys(who, reason, exportReason string, marked func()) (*lockResult, error) {
	d.vmLocks.mu.Lock()
	if busy := d.vmLocks.busyOpsLocked(); len(busy) > 0 {
		d.vmLocks.mu.Unlock()
		return nil, conflict("lock refused, nothing changed: operation in progress on %s; wait for it to finish, or stop the daemon (which zeroes every key too)", strings.Join(busy, ", "))
	}
	already := d.keyring.Locked()
	// Under vmLocks.mu, so no operation starts between the check and the
	// lock; one starting afterwards finds the keyring locked.
	zeroed := d.keyring.Lock()
	marked()
	d.vmLocks.mu.Unlock()

	res := &lockResult{LockResult: api.LockResult{KEKsZeroed: zeroed, AlreadyLocked: already}}
	refs := d.neededKeys()
	d.mu.Lock()
	for _, ref := range refs {
		d.keyErrs[ref] = reason
		res.refs = append(res.refs, ref.String())
	}
	mounts := make([]*activeMount, 0, len(d.mounts))
	for _, m := range d.mounts {
		mounts = append(mounts, m)
	}
	d.mu.Unlock()

	var errs []error
	for _, m := range mounts {
		m.ds.Forget("") // every cached DEK of the view, zeroed
		vr, err := m.view.Lock()
		res.Views++
		res.FilesSealed += vr.Sealed
		res.PagesInvalidated += vr.Invalidated
		if err != nil {
			errs = append(errs, fmt.Errorf("view %s: %w", m.rec.Mountpoint, err))
		}
	}
	errs = append(errs, d.suspendExports(exportReason)...)
	d.log.Warn("keys locked", "by", who, "keks_zeroed", zeroed, "views", res.Views, "files_sealed", res.FilesSealed)
	if len(errs) > 0 {
		// Every key is zeroed whatever happened; say what did not close
		// cleanly instead of reporting plain success.
		return res, fmt.Errorf("locked (every key zeroed), but: %w", errors.Join(errs...))
	}
	return res, nil
}

// hUnlock is `vmcryptd unlock`: key fetching resumes and every needed KEK
// is fetched now; the answer lists the ones that could not be had.
func (d *Daemon) hUnlock(rc *reqCtx) (any, error) {
	d.mgrMu.Lock()
	byMgr := d.mgrLocked
	if !byMgr {
		d.localLocked = false
	}
	reason := d.mgrLockReason
	d.mgrMu.Unlock()
	if byMgr {
		return nil, conflict("unlock refused: %s", reason)
	}
	ctx, cancel := context.WithTimeout(rc.r.Context(), 2*time.Minute)
	defer cancel()
	res := d.unlockKeys(ctx)
	d.log.Info("keys unlocked", "user", rc.id.User, "loaded", len(res.Loaded), "failed", len(res.Failed))
	return res, nil
}

// unlockKeys lets keys be fetched again and fetches every needed KEK now.
func (d *Daemon) unlockKeys(ctx context.Context) unlockResult {
	res := unlockResult{api.UnlockResult{WasLocked: d.keyring.Locked(), Loaded: []string{}, Failed: []api.KeyFailure{}}}
	d.keyring.Unlock()
	refs := d.neededKeys()
	d.mu.Lock()
	for _, ref := range refs {
		delete(d.keyErrs, ref) // the lock's reason; loadKeys records real ones
	}
	d.mu.Unlock()
	d.loadKeys(ctx)
	d.restoreExports(ctx)
	d.mu.Lock()
	for _, ref := range refs {
		if d.keyring.Cached(ref) {
			res.Loaded = append(res.Loaded, ref.String())
		} else {
			msg := d.keyErrs[ref]
			if msg == "" {
				msg = "not fetched"
			}
			res.Failed = append(res.Failed, api.KeyFailure{Key: ref.String(), Error: msg})
		}
	}
	d.mu.Unlock()
	return res
}

package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/fusefs"
	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/config"
)

// newDatastore is the resolver a view or an export of the datastore root
// asks: the daemon's keyring, its made-files set for root, its VM locks as
// the busy test, the configured core dump names, and the key loader's last
// errors as reasons.
func (d *Daemon) newDatastore(root string) (*view.Datastore, error) {
	impl, err := container.ChooseImpl()
	if err != nil {
		return nil, err
	}
	return view.NewDatastore(root, d.keyring, view.DatastoreOptions{
		Impl:             impl,
		Made:             d.madeFiles(root),
		Busy:             d.vmLocks.isBusy,
		CoreDumpPatterns: d.config().CoreDumpPatterns,
		KeyErr: func(r keys.KeyRef) string {
			d.mu.Lock()
			defer d.mu.Unlock()
			return d.keyErrs[r]
		},
	}), nil
}

type activeMount struct {
	rec  mountRecord
	view *fusefs.View
	ds   *view.Datastore
}

type mountRecord struct {
	Datastore  string `json:"datastore"` // absolute path
	Mountpoint string `json:"mountpoint"`
	ReadOnly   bool   `json:"read_only,omitempty"`
	AllowOther bool   `json:"allow_other,omitempty"`
}

// datastorePath resolves a datastore given by name or path.
func (d *Daemon) datastorePath(s string) (string, error) { return datastorePath(d.config(), s) }

// datastorePath resolves a datastore of cfg given by name or path.
func datastorePath(cfg *config.Config, s string) (string, error) {
	for _, ds := range cfg.Datastores {
		if ds.Name == s {
			real, err := filepath.EvalSymlinks(ds.Path)
			if err != nil {
				return "", badRequest("datastore %s: %v", ds.Path, err)
			}
			return real, nil
		}
	}
	if !filepath.IsAbs(s) {
		return "", badRequest("no datastore named %q", s)
	}
	if len(cfg.Datastores) == 0 {
		// Resolved, so paths compare equal to the resolved VM dirs.
		real, err := filepath.EvalSymlinks(s)
		if err != nil {
			return "", badRequest("datastore %s: %v", s, err)
		}
		return real, nil
	}
	return datastoreRoot(cfg, s)
}

// registerDatastoreVMs records every encrypted VM directly under root so
// the key loader fetches their KEKs. A VM whose files cannot be read in
// time (a FIFO where a VM file belongs) is skipped, not waited for.
func (d *Daemon) registerDatastoreVMs(ctx context.Context, root string) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	var dirs []string
	for _, e := range ents {
		if e.IsDir() {
			dirs = append(dirs, filepath.Join(root, e.Name()))
		}
	}
	eachBounded(ctx, dirs, 4, statusReadTimeout, func(dir string) {
		// A read still stuck from an earlier call is not started again:
		// one stuck file costs one goroutine, however often views mount.
		if !d.beginRead(dir) {
			d.log.Warn("an earlier read of this VM's files is still stuck; skipped", "dir", dir)
			return
		}
		defer d.endRead(dir)
		st, err := vm.ReadVMStatus(dir, d.config().CoreDumpPatterns)
		if err == nil && st.Encrypted {
			if err := d.registerVM(st, ""); err != nil {
				d.log.Warn("register VM", "dir", st.Dir, "err", err)
			}
		}
	}, func(dir string) {
		d.log.Warn("reading a VM's files did not finish in time; skipped (is one of them a FIFO or on a hung filesystem?)", "dir", dir, "timeout", statusReadTimeout)
	})
}

func (d *Daemon) mount(ctx context.Context, rec mountRecord) error {
	d.mu.Lock()
	if _, busy := d.mounts[rec.Mountpoint]; busy {
		d.mu.Unlock()
		return conflict("%s is already a vmcryptd mount", rec.Mountpoint)
	}
	stopping := d.stopping
	d.mu.Unlock()
	if stopping {
		return conflict("the daemon is stopping: not mounting %s", rec.Mountpoint)
	}
	if msg := nestedMount(rec.Datastore, rec.Mountpoint); msg != "" {
		return badRequest("%s", msg)
	}
	// A dead FUSE mount left by a killed daemon (whatever started it)
	// answers ENOTCONN to everything, mkdir included: detach it first.
	if _, err := fusefs.CleanupStale(rec.Mountpoint); err != nil {
		return badRequest("mountpoint %s: %v", rec.Mountpoint, err)
	}
	if err := os.MkdirAll(rec.Mountpoint, 0o755); err != nil {
		return badRequest("mountpoint %s: %v", rec.Mountpoint, err)
	}
	// Never mount over something: the mountpoint must be an empty
	// directory.
	if ents, err := os.ReadDir(rec.Mountpoint); err != nil || len(ents) > 0 {
		return badRequest("mountpoint %s must be an empty directory", rec.Mountpoint)
	}
	d.registerDatastoreVMs(ctx, rec.Datastore)
	d.loadKeys(ctx)
	ds, err := d.newDatastore(rec.Datastore)
	if err != nil {
		return err
	}
	view, err := fusefs.Mount(rec.Datastore, rec.Mountpoint, ds, fusefs.Options{
		ReadOnly: rec.ReadOnly, AllowOther: rec.AllowOther, Logger: d.log, Observer: d.metrics.view,
	})
	if err != nil {
		ds.Close()
		return fmt.Errorf("mount %s on %s: %w", rec.Datastore, rec.Mountpoint, err)
	}
	d.mu.Lock()
	if d.stopping || d.mounts[rec.Mountpoint] != nil {
		// Shutdown began (or a twin mount won) while this one was being
		// set up: a view nobody will unmount must not stay behind.
		d.mu.Unlock()
		view.Unmount(true)
		ds.Close()
		return conflict("%s: mount abandoned (daemon stopping, or mounted meanwhile)", rec.Mountpoint)
	}
	d.mounts[rec.Mountpoint] = &activeMount{rec: rec, view: view, ds: ds}
	d.mu.Unlock()
	d.log.Info("view mounted", "datastore", rec.Datastore, "mountpoint", rec.Mountpoint)
	return nil
}

func (d *Daemon) unmount(mp string, force bool) error {
	d.mu.Lock()
	m, ok := d.mounts[mp]
	d.mu.Unlock()
	if !ok {
		// A view of a daemon that was killed is no mount of ours, but
		// --force may still clear it away when it is a dead FUSE mount.
		if force {
			if cleaned, err := fusefs.CleanupStale(mp); err != nil {
				return badRequest("%v", err)
			} else if cleaned {
				d.log.Info("stale FUSE mount detached", "mountpoint", mp)
				return nil
			}
		}
		return notFound("%s is not a vmcryptd mount", mp)
	}
	if err := m.view.Unmount(force); err != nil {
		if errors.Is(err, fusefs.ErrBusy) {
			return conflict("%v (use --force)", err)
		}
		return err
	}
	m.ds.Close()
	d.mu.Lock()
	delete(d.mounts, mp)
	d.mu.Unlock()
	return nil
}

// beginRead marks dir as being read; false if a read is already running.
func (d *Daemon) beginRead(dir string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.reading == nil {
		d.reading = map[string]bool{}
	}
	if d.reading[dir] {
		return false
	}
	d.reading[dir] = true
	return true
}

func (d *Daemon) endRead(dir string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.reading, dir)
}

// nestedMount refuses a view mounted inside its own datastore, or a
// datastore inside the view's mountpoint: the view would serve itself
// (a loop the kernel cannot break) or hide its own backing files. Both
// paths are absolute and clean; "" allows.
func nestedMount(datastore, mountpoint string) string {
	within := func(p, dir string) bool {
		return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
	}
	switch {
	case within(mountpoint, datastore):
		return fmt.Sprintf("mountpoint %s is inside the datastore %s it would show: choose a directory outside it", mountpoint, datastore)
	case within(datastore, mountpoint):
		return fmt.Sprintf("datastore %s is inside the mountpoint %s: the view would hide its own files", datastore, mountpoint)
	}
	return ""
}

// madeFiles is the set of disks made through views of the datastore at
// root, shared by all its mounts (a remount still knows them).
func (d *Daemon) madeFiles(root string) *view.MadeFiles {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.made == nil {
		d.made = map[string]*view.MadeFiles{}
	}
	m, ok := d.made[root]
	if !ok {
		m = view.NewMadeFiles()
		d.made[root] = m
	}
	return m
}

// forgetDEKs drops cached DEKs of dir from every view after an operation
// changed its keys.
func (d *Daemon) forgetDEKs(dir string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, m := range d.mounts {
		m.ds.Forget(dir)
	}
}

// openFilesUnder lists files of dir that are open through a view or
// held by an NBD export.
func (d *Daemon) openFilesUnder(dir string) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for _, m := range d.mounts {
		rel, err := filepath.Rel(m.rec.Datastore, dir)
		if err != nil || strings.HasPrefix(rel, "..") {
			continue
		}
		for _, p := range m.view.OpenFiles() {
			if p == rel || strings.HasPrefix(p, rel+"/") {
				out = append(out, filepath.Join(m.rec.Mountpoint, p))
			}
		}
	}
	out = append(out, d.exportedFilesUnderLocked(dir)...)
	sort.Strings(out)
	return out
}

func (d *Daemon) saveMounts() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var recs []mountRecord
	for _, m := range d.mounts {
		if !d.configMount(m.rec.Mountpoint) {
			recs = append(recs, m.rec)
		}
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].Mountpoint < recs[j].Mountpoint })
	old := d.st.Mounts
	d.st.Mounts = recs
	if err := d.st.save(d.statePath()); err != nil {
		d.st.Mounts = old
		return err
	}
	return nil
}

func (d *Daemon) configMount(mp string) bool {
	for _, m := range d.config().Mounts {
		if filepath.Clean(m.Mountpoint) == mp {
			return true
		}
	}
	return false
}

// restoreMounts re-establishes configured and remembered mounts after a
// start (dead FUSE mounts of a killed daemon are lazily unmounted first).
// Mounts are set up side by side, each bounded: one stuck mount delays
// no other.
func (d *Daemon) restoreMounts(ctx context.Context) {
	var recs []mountRecord
	for _, m := range d.config().Mounts {
		root, err := d.datastorePath(m.Datastore)
		if err != nil {
			d.log.Error("configured mount", "datastore", m.Datastore, "err", err)
			continue
		}
		recs = append(recs, mountRecord{Datastore: root, Mountpoint: filepath.Clean(m.Mountpoint), ReadOnly: m.ReadOnly, AllowOther: m.AllowOther})
	}
	d.mu.Lock()
	recs = append(recs, d.st.Mounts...)
	d.mu.Unlock()
	seen := map[string]bool{}
	uniq := recs[:0]
	for _, r := range recs {
		if !seen[r.Mountpoint] {
			seen[r.Mountpoint] = true
			uniq = append(uniq, r)
		}
	}
	eachBounded(ctx, uniq, 4, mountTimeout, func(r mountRecord) {
		if err := d.mount(ctx, r); err != nil {
			d.log.Error("remount failed", "mountpoint", r.Mountpoint, "err", err)
		}
	}, func(r mountRecord) {
		d.log.Error("remount still not done; going on without waiting for it", "mountpoint", r.Mountpoint, "timeout", mountTimeout)
	})
}

func (d *Daemon) unmountAll() {
	d.mu.Lock()
	mps := make([]string, 0, len(d.mounts))
	for mp := range d.mounts {
		mps = append(mps, mp)
	}
	d.mu.Unlock()
	// All at once, and bounded: a view whose server is stuck in an
	// operation is detached by the forced unmount anyway, and dies with
	// the process.
	eachBounded(context.Background(), mps, len(mps)+1, shutdownUnmount, func(mp string) {
		if err := d.unmount(mp, true); err != nil {
			d.log.Error("unmount at shutdown", "mountpoint", mp, "err", err)
		}
	}, func(mp string) {
		d.log.Error("unmount at shutdown did not finish in time; the view is detached and ends with the daemon", "mountpoint", mp)
	})
}

type mountResult struct {
	api.MountInfo
}

func (m mountResult) audit() (string, []string) { return m.Mountpoint, nil }

func (d *Daemon) hMount(rc *reqCtx) (any, error) {
	var req api.MountRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	// Shared from the datastore check to the view's registration (see
	// Daemon.servedMu).
	d.servedMu.RLock()
	defer d.servedMu.RUnlock()
	root, err := d.datastorePath(req.Datastore)
	if err != nil {
		return nil, err
	}
	if !filepath.IsAbs(req.Mountpoint) {
		return nil, badRequest("mountpoint must be an absolute path")
	}
	rec := mountRecord{Datastore: root, Mountpoint: filepath.Clean(req.Mountpoint), ReadOnly: req.ReadOnly, AllowOther: req.AllowOther}
	if err := d.mountAllowed(rc.id, rec.Mountpoint); err != nil {
		return nil, err
	}
	if err := d.mount(rc.r.Context(), rec); err != nil {
		return nil, err
	}
	if err := d.saveMounts(); err != nil {
		return nil, err
	}
	return mountResult{api.MountInfo{Datastore: root, Mountpoint: rec.Mountpoint, ReadOnly: rec.ReadOnly}}, nil
}

// mountAllowed keeps callers other than root to mountpoints that are
// direct children of a configured mount root: the daemon creates the
// directory and mounts over it as root, so no path component it follows
// may be changeable by the caller. The mount root must be a directory
// owned by root and writable by no one else (then nobody but root can
// swap the child for a symlink between this check and the mount), and
// the child, if it exists, must be a directory itself, not a symlink.
func (d *Daemon) mountAllowed(id identity, mp string) error {
	if id.UID == 0 {
		return nil
	}
	if len(d.config().MountRoots) == 0 {
		return forbidden("only root may mount views here: no mount_roots are configured")
	}
	mp = filepath.Clean(mp)
	parent := filepath.Dir(mp)
	for _, r := range d.config().MountRoots {
		if filepath.Clean(r) != parent {
			continue
		}
		if err := safeMountRoot(parent); err != nil {
			return forbidden("mount root %s: %v", parent, err)
		}
		st, err := os.Lstat(mp)
		if err == nil && !st.IsDir() {
			return badRequest("mountpoint %s is not a directory", mp)
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return badRequest("mountpoint %s: %v", mp, err)
		}
		return nil
	}
	return forbidden("mountpoint %s is not a directory directly inside a configured mount root (%s)", mp, strings.Join(d.config().MountRoots, ", "))
}

// safeMountRoot requires every component of dir, from / down, to be a
// real directory (no symlinks) owned by root and not writable by group or
// others, so only root can change what the path leads to.
func safeMountRoot(dir string) error {
	p := dir
	for {
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		if !st.IsDir() {
			return fmt.Errorf("%s is not a directory (symlinks are not accepted)", p)
		}
		sys, ok := st.Sys().(*syscall.Stat_t)
		if !ok || sys.Uid != 0 {
			return fmt.Errorf("%s is not owned by root", p)
		}
		if st.Mode().Perm()&0o022 != 0 && st.Mode()&os.ModeSticky == 0 {
			return fmt.Errorf("%s is writable by group or others", p)
		}
		if st.Mode()&os.ModeSticky != 0 && p == dir {
			return fmt.Errorf("%s is a shared (sticky) directory", p)
		}
		parent := filepath.Dir(p)
		if parent == p {
			return nil
		}
		p = parent
	}
}

func (d *Daemon) hUnmount(rc *reqCtx) (any, error) {
	var req api.UnmountRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	mp := filepath.Clean(req.Mountpoint)
	if err := d.unmount(mp, req.Force); err != nil {
		return nil, err
	}
	if err := d.saveMounts(); err != nil {
		return nil, err
	}
	return mountResult{api.MountInfo{Mountpoint: mp}}, nil
}

func (d *Daemon) mountInfos() []api.MountInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := []api.MountInfo{}
	for _, m := range d.mounts {
		out = append(out, api.MountInfo{Datastore: m.rec.Datastore, Mountpoint: m.rec.Mountpoint, ReadOnly: m.rec.ReadOnly, OpenFiles: m.view.OpenFiles()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Mountpoint < out[j].Mountpoint })
	return out
}

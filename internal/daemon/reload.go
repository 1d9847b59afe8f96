package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/config"
	"github.com/vmcryptd/vmcryptd/kms"
)

// configSections are the parts of the configuration, by their TOML
// names, and whether a reload can apply a change to them; restart says
// why one cannot (the refusal quotes it).
var configSections = []struct {
	name    string
	restart string // "" when a reload applies it
	get     func(*config.Config) any
}{
	{"roles", "", func(c *config.Config) any { return c.Roles }},
	{"kms", "", func(c *config.Config) any { return c.KMS }},
	{"default_provider", "", func(c *config.Config) any { return c.DefaultProvider }},
	{"datastores", "", func(c *config.Config) any { return c.Datastores }},
	{"mounts", "", func(c *config.Config) any { return c.Mounts }},
	{"mount_roots", "", func(c *config.Config) any { return c.MountRoots }},
	{"key_retry_interval", "", func(c *config.Config) any { return c.KeyRetryInterval }},
	{"metrics_listen", "", func(c *config.Config) any { return c.MetricsListen }},
	{"manager", "the key source is chosen at start", func(c *config.Config) any { return c.Manager }},
	{"socket", "the API socket is made at start", func(c *config.Config) any { return c.Socket }},
	{"socket_group", "the API socket is made at start", func(c *config.Config) any { return c.SocketGroup }},
	{"state_dir", "the state is opened at start", func(c *config.Config) any { return c.StateDir }},
	{"audit_log", "the audit log is opened at start", func(c *config.Config) any { return c.AuditLog }},
	{"core_dump_patterns", "which files a mounted view decrypts under the host key is fixed when it mounts", func(c *config.Config) any { return c.CoreDumpPatterns }},
}

// reloadPlan compares the running configuration with a new one: apply
// lists the changed sections a reload can apply, restart those it cannot
// (each with its reason). A reload goes ahead only when restart is empty
// (all or nothing).
func reloadPlan(running, next *config.Config) (apply, restart []string) {
	for _, s := range configSections {
		if reflect.DeepEqual(s.get(running), s.get(next)) {
			continue
		}
		if s.restart == "" {
			apply = append(apply, s.name)
		} else {
			restart = append(restart, s.name+" ("+s.restart+")")
		}
	}
	return apply, restart
}

// defaultRetryInterval is key_retry_interval when the file sets none.
const defaultRetryInterval = 10 * time.Second

// Reload reads the configuration file again and applies it whole, or
// changes nothing: a file that does not load (the error names the line
// and the reason), that changes a section this version applies only at
// start, or whose change cannot be carried out (a removed datastore still
// mounted, a removed key provider still holding keys, a new mount that
// fails, a metrics address that is taken...) is refused, whatever was
// already done for it is undone, and the running configuration stays.
func (d *Daemon) Reload(ctx context.Context) (api.ReloadResult, error) {
	res := api.ReloadResult{Config: d.cfgPath, Applied: []string{}, Changes: []string{}}
	if d.cfgPath == "" {
		return res, fmt.Errorf("reload: the daemon was started without a configuration file")
	}
	refuse := func(err error) (api.ReloadResult, error) {
		return res, fmt.Errorf("reload refused, running configuration kept: config %s: %w", d.cfgPath, err)
	}
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	d.servedMu.Lock() // see Daemon.servedMu
	defer d.servedMu.Unlock()
	next, err := config.Load(d.cfgPath)
	if err != nil {
		// config.Load names the file itself.
		return res, fmt.Errorf("reload refused, running configuration kept: %w", err)
	}
	auth, err := newAuthorizer(next.Roles)
	if err != nil {
		return refuse(err)
	}
	running := d.config()
	apply, restart := reloadPlan(running, next)
	if len(restart) > 0 {
		return refuse(fmt.Errorf("it changes %s, which this version applies only at start: restart the daemon (systemctl restart vmcryptd)",
			strings.Join(restart, ", ")))
	}
	if len(apply) == 0 {
		return res, nil
	}
	tx := &reloadTx{providers: map[string]*kms.Provider{}}
	if err := d.prepareReload(ctx, running, next, tx); err != nil {
		if rerr := d.rollbackReload(ctx, tx); rerr != nil {
			err = fmt.Errorf("%w; undoing it: %v", err, rerr)
		}
		return refuse(err)
	}
	d.commitReload(running, next, auth, tx)
	res.Applied = append(res.Applied, apply...)
	res.Changes = append(res.Changes, tx.changes...)
	d.log.Info("configuration reloaded", "config", d.cfgPath, "applied", strings.Join(apply, ","), "changes", strings.Join(tx.changes, "; "))
	return res, nil
}

// reloadTx is what a reload has prepared (and, for mounts, already done)
// before it commits; rollbackReload undoes it.
type reloadTx struct {
	providers map[string]*kms.Provider // built for added or changed [[kms]], not yet in use
	drop      []string                 // [[kms]] names removed from the file
	unmounted []mountRecord            // configured views taken down (removed or changed)
	mounted   []string                 // mountpoints of views mounted for new or changed [[mounts]]
	metrics   *metricsListener         // bound for a new metrics_listen
	newMetric bool                     // metrics_listen changed while serving
	changes   []string                 // one line per change, for the reply and the log
}

func (tx *reloadTx) note(format string, args ...any) {
	tx.changes = append(tx.changes, fmt.Sprintf(format, args...))
}

// prepareReload checks every change next makes against the running
// daemon and prepares it: nothing visible changes except configured views
// (taken down and mounted), which rollbackReload restores.
func (d *Daemon) prepareReload(ctx context.Context, running, next *config.Config, tx *reloadTx) error {
	if err := d.prepareProviders(running, next, tx); err != nil {
		return err
	}
	if running.MetricsListen != next.MetricsListen {
		d.mu.Lock()
		serving := d.serving
		d.mu.Unlock()
		if serving {
			tx.newMetric = true
			if next.MetricsListen != "" {
				ml, err := d.listenMetrics(next.MetricsListen)
				if err != nil {
					return err
				}
				tx.metrics = ml
			}
		}
		tx.note("metrics_listen %q", next.MetricsListen)
	}
	if err := d.prepareMounts(ctx, running, next, tx); err != nil {
		return err
	}
	// After the views the file removes are down: a datastore may go
	// with its configured view, never from under one that stays.
	return d.checkDatastores(running, next, tx)
}

// prepareProviders builds the providers the file adds or changes and
// refuses the removal of one that a VM or the host key still needs.
func (d *Daemon) prepareProviders(running, next *config.Config, tx *reloadTx) error {
	cur := map[string]kms.Config{}
	for _, kc := range running.KMS {
		cur[kc.Name] = kc
	}
	nxt := map[string]bool{}
	for _, kc := range next.KMS {
		nxt[kc.Name] = true
	}
	needed := map[string]string{} // provider -> a key it holds that is needed
	for _, ref := range d.neededKeys() {
		if _, ok := needed[ref.Provider]; !ok {
			needed[ref.Provider] = ref.String()
		}
	}
	for _, kc := range running.KMS {
		if nxt[kc.Name] {
			continue
		}
		if key, ok := needed[kc.Name]; ok {
			return fmt.Errorf("it removes key provider %q, which still holds the needed key %s (a VM or the host key uses it): keep it in the file", kc.Name, key)
		}
		tx.drop = append(tx.drop, kc.Name)
		tx.note("key provider %s removed", kc.Name)
	}
	d.mu.Lock()
	source := map[string]string{}
	for name, s := range d.source {
		source[name] = s
	}
	d.mu.Unlock()
	for _, kc := range next.KMS {
		old, had := cur[kc.Name]
		if had && reflect.DeepEqual(old, kc) {
			continue
		}
		if !had && source[kc.Name] == "api" {
			return fmt.Errorf("it adds key provider %q, which exists already (added with 'vmcryptd kms add'): remove that one first or choose another name", kc.Name)
		}
		p, err := kms.New(kc, d.log.With("provider", kc.Name))
		if err != nil {
			return err
		}
		tx.providers[kc.Name] = p
		if had {
			tx.note("key provider %s changed", kc.Name)
		} else {
			tx.note("key provider %s added", kc.Name)
		}
	}
	return nil
}

// checkDatastores refuses to drop (or move) a datastore that a view
// shows or a VM operation works in, and to add one that is no directory.
func (d *Daemon) checkDatastores(running, next *config.Config, tx *reloadTx) error {
	if err := d.checkServedInside(next); err != nil {
		return err
	}
	nxt := map[string]string{}
	for _, ds := range next.Datastores {
		nxt[ds.Name] = ds.Path
	}
	cur := map[string]string{}
	for _, ds := range running.Datastores {
		cur[ds.Name] = ds.Path
		if p, ok := nxt[ds.Name]; ok && p == ds.Path {
			continue
		}
		root, err := filepath.EvalSymlinks(ds.Path)
		if err != nil {
			continue // nothing can be mounted from or working in it
		}
		if _, err := datastoreRoot(next, root); err == nil {
			continue // still a datastore under another name
		}
		if mps := d.mountsOf(root); len(mps) > 0 {
			return fmt.Errorf("it removes datastore %q (%s), which is mounted on %s: unmount it first", ds.Name, ds.Path, strings.Join(mps, ", "))
		}
		if d.vmLocks.isBusy(root) {
			return fmt.Errorf("it removes datastore %q (%s), where a VM operation is running: wait for it to end", ds.Name, ds.Path)
		}
		if _, ok := nxt[ds.Name]; ok {
			tx.note("datastore %s moved from %s to %s", ds.Name, ds.Path, nxt[ds.Name])
		} else {
			tx.note("datastore %s (%s) removed", ds.Name, ds.Path)
		}
	}
	for _, ds := range next.Datastores {
		if p, ok := cur[ds.Name]; ok && p == ds.Path {
			continue
		}
		st, err := os.Stat(ds.Path)
		if err != nil {
			return fmt.Errorf("datastore %q: %w", ds.Name, err)
		}
		if !st.IsDir() {
			return fmt.Errorf("datastore %q: %s is not a directory", ds.Name, ds.Path)
		}
		if _, ok := cur[ds.Name]; !ok {
			tx.note("datastore %s (%s) added", ds.Name, ds.Path)
		}
	}
	return nil
}

// checkServedInside refuses a next configuration that leaves a running
// view or NBD export outside every datastore it names (a datastore
// removed or moved from under it, or a first [[datastores]] where any
// path was allowed). It compares the paths the views and exports were
// set up with, not what the old entries resolve to now.
func (d *Daemon) checkServedInside(next *config.Config) error {
	if len(next.Datastores) == 0 {
		return nil // any absolute path is allowed
	}
	type served struct{ what, path string }
	var all []served
	d.mu.Lock()
	for mp, m := range d.mounts {
		all = append(all, served{"the view on " + mp, m.rec.Datastore})
	}
	for _, e := range d.exports {
		all = append(all, served{"the NBD export of " + e.rec.Disk, e.rec.Disk})
	}
	d.mu.Unlock()
	var roots []string
	for _, ds := range next.Datastores {
		if r, err := filepath.EvalSymlinks(ds.Path); err == nil {
			roots = append(roots, r)
		}
	}
	var stray []string
	for _, s := range all {
		inside := false
		for _, r := range roots {
			inside = inside || s.path == r || strings.HasPrefix(s.path, r+"/")
		}
		if !inside {
			stray = append(stray, fmt.Sprintf("%s (%s)", s.what, s.path))
		}
	}
	if len(stray) > 0 {
		sort.Strings(stray)
		return fmt.Errorf("it leaves %s outside every configured datastore: unmount or stop it first", strings.Join(stray, ", "))
	}
	return nil
}

// mountsOf lists the mountpoints of the views showing the datastore root.
func (d *Daemon) mountsOf(root string) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for mp, m := range d.mounts {
		if m.rec.Datastore == root {
			out = append(out, mp)
		}
	}
	sort.Strings(out)
	return out
}

// configMounts resolves cfg's [[mounts]] by mountpoint; a datastore that
// does not resolve is an error when strict, and skipped otherwise.
func configMounts(cfg *config.Config, strict bool) (map[string]mountRecord, error) {
	out := map[string]mountRecord{}
	for _, m := range cfg.Mounts {
		root, err := datastorePath(cfg, m.Datastore)
		if err != nil {
			if strict {
				return nil, fmt.Errorf("mount on %s: %w", m.Mountpoint, err)
			}
			continue
		}
		mp := filepath.Clean(m.Mountpoint)
		out[mp] = mountRecord{Datastore: root, Mountpoint: mp, ReadOnly: m.ReadOnly, AllowOther: m.AllowOther}
	}
	return out, nil
}

// prepareMounts takes down configured views the file removes or changes
// (refused while a file is open in one) and mounts the ones it adds or
// changes. A view mounted through the API that the file now names with
// the same settings is adopted as it is.
func (d *Daemon) prepareMounts(ctx context.Context, running, next *config.Config, tx *reloadTx) error {
	if reflect.DeepEqual(running.Mounts, next.Mounts) && reflect.DeepEqual(running.Datastores, next.Datastores) {
		return nil
	}
	cur, _ := configMounts(running, false)
	want, err := configMounts(next, true)
	if err != nil {
		return err
	}
	active := func(mp string) (mountRecord, []string, bool) {
		d.mu.Lock()
		defer d.mu.Unlock()
		m, ok := d.mounts[mp]
		if !ok {
			return mountRecord{}, nil, false
		}
		return m.rec, m.view.OpenFiles(), true
	}
	var down, up []mountRecord
	for _, mp := range sortedKeys(cur) {
		rec, open, ok := active(mp)
		if w, keep := want[mp]; keep && w == cur[mp] || !ok {
			continue
		}
		if len(open) > 0 {
			return fmt.Errorf("it removes or changes the view on %s, which has open files (%s): close them first", mp, strings.Join(open, ", "))
		}
		down = append(down, rec)
	}
	for _, mp := range sortedKeys(want) {
		w := want[mp]
		if c, had := cur[mp]; had && c == w {
			continue
		}
		rec, _, ok := active(mp)
		_, wasConfig := cur[mp]
		switch {
		case ok && !wasConfig && rec == w:
			tx.note("view on %s (mounted with 'vmcryptd mount') is now configured", mp)
			continue
		case ok && !wasConfig:
			return fmt.Errorf("it configures a view on %s, where 'vmcryptd mount' mounted %s with other settings: unmount it first", mp, rec.Datastore)
		}
		up = append(up, w)
	}
	for _, rec := range down {
		if err := d.unmount(rec.Mountpoint, false); err != nil {
			return fmt.Errorf("unmount %s: %w", rec.Mountpoint, err)
		}
		tx.unmounted = append(tx.unmounted, rec)
		tx.note("view on %s unmounted", rec.Mountpoint)
	}
	for _, rec := range up {
		if err := d.mount(ctx, rec); err != nil {
			return err
		}
		tx.mounted = append(tx.mounted, rec.Mountpoint)
		tx.note("view of %s mounted on %s", rec.Datastore, rec.Mountpoint)
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// rollbackReload undoes what prepareReload did; its error lists what could
// not be restored.
func (d *Daemon) rollbackReload(ctx context.Context, tx *reloadTx) error {
	var errs []error
	for _, p := range tx.providers {
		p.Close()
	}
	tx.metrics.stop()
	for _, mp := range tx.mounted {
		if err := d.unmount(mp, true); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	for _, rec := range tx.unmounted {
		if err := d.mount(ctx, rec); err != nil {
			errs = append(errs, fmt.Errorf("remount %s: %w", rec.Mountpoint, err))
		}
	}
	return errors.Join(errs...)
}

// commitReload puts next in force; nothing in it can fail.
func (d *Daemon) commitReload(running, next *config.Config, auth *authorizer, tx *reloadTx) {
	d.auth.mu.Lock()
	d.auth.bindings = auth.bindings
	d.auth.mu.Unlock()

	var closing []*kms.Provider
	d.mu.Lock()
	for _, name := range tx.drop {
		if p := d.providers[name]; p != nil {
			closing = append(closing, p)
		}
		delete(d.providers, name)
		delete(d.source, name)
		d.keyring.SetProvider(name, nil)
	}
	for name, p := range tx.providers {
		if old := d.providers[name]; old != nil {
			closing = append(closing, old)
		}
		d.providers[name] = p
		d.source[name] = "config"
		d.keyring.SetProvider(name, p) // cached KEKs stay; fetches use the new one
	}
	var oldMetrics *metricsListener
	if tx.newMetric {
		oldMetrics, d.metricsSrv = d.metricsSrv, tx.metrics
	}
	d.conf.Store(next)
	d.mu.Unlock()

	oldMetrics.stop()
	if len(closing) > 0 {
		// A fetch still running on a replaced provider ends with an error
		// and is retried on the new one.
		go func() {
			for _, p := range closing {
				p.Close()
			}
		}()
	}
	if running.KeyRetryInterval != next.KeyRetryInterval {
		iv := next.KeyRetryInterval
		if iv <= 0 {
			iv = defaultRetryInterval
		}
		d.retry.Store(int64(iv))
		tx.note("key_retry_interval %s", iv)
	}
	if running.KeyRetryInterval != next.KeyRetryInterval || len(tx.providers) > 0 {
		// Fetch what is missing now, on the new providers and interval.
		select {
		case d.retryReset <- struct{}{}:
		default:
		}
	}
	if !reflect.DeepEqual(running.Mounts, next.Mounts) {
		// Configured views are not remembered in the state; one that the
		// file adopted from the API is forgotten there.
		if err := d.saveMounts(); err != nil {
			d.log.Error("reload: saving the remembered mounts", "err", err)
		}
	}
}

type reloadResult struct{ api.ReloadResult }

func (r reloadResult) audit() (string, []string) { return r.Config, nil }

func (d *Daemon) hReload(rc *reqCtx) (any, error) {
	// A client that goes away does not cut a reload short halfway.
	res, err := d.Reload(context.WithoutCancel(rc.r.Context()))
	if err != nil {
		return nil, conflict("%v", err)
	}
	return reloadResult{res}, nil
}

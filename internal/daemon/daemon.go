// Package daemon is vmcryptd's long-running process: it holds KEKs in
// locked memory, serves the HTTP/JSON API on a unix socket, checks every
// request against the caller's role (SO_PEERCRED) and audits every
// cryptographic operation.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/config"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
	"github.com/vmcryptd/vmcryptd/kms"
)

// Options configure a Daemon.
type Options struct {
	Config  *config.Config
	Logger  *slog.Logger
	Version string
	// RetryInterval is how often keys that could not be fetched are tried
	// again (default 10s).
	RetryInterval time.Duration
	// ConfigPath is the file Config came from; Reload reads it again.
	ConfigPath string
}

// The engine reaches key providers only through its KeyServer (and, for
// key states, KeyStateServer) interface; a KMIP provider must satisfy both.
var (
	_ keys.KeyServer      = (*kms.Provider)(nil)
	_ keys.KeyStateServer = (*kms.Provider)(nil)
)

// Daemon is one running vmcryptd.
type Daemon struct {
	// ready is set once the start-up restore of mounts and exports has
	// finished (each up, or its failure recorded); status reports it.
	ready atomic.Bool
	// conf is the running configuration, an immutable snapshot that
	// Reload replaces whole (reload.go); read it with config().
	conf     atomic.Pointer[config.Config]
	cfgPath  string     // see Reload (reload.go)
	reloadMu sync.Mutex // one reload at a time
	// servedMu orders requests that start serving or working in a
	// datastore against a reload that may drop it: a mount, an export or
	// a VM operation holds it shared from its datastore check until what
	// it starts is registered (d.mounts, d.exports, d.vmLocks); Reload
	// holds it exclusively from its checks to its commit. So a reload
	// either sees the registration (and refuses to drop the datastore) or
	// the request sees the new configuration (and refuses the path).
	servedMu sync.RWMutex
	log      *slog.Logger
	version  string
	// retry is how often keys that could not be fetched are tried again
	// (a time.Duration; a reload may change it).
	retry atomic.Int64
	// retryReset wakes the key-retry loop so a new interval applies now.
	retryReset chan struct{}
	// readTimeout bounds reading a request (headers and body).
	readTimeout time.Duration
	auth        *authorizer
	audit       *auditLog
	keyring     *keys.Keyring
	started     time.Time
	// mgr is the manager client when the manager is the key source
	// ([manager] in the config); nil for a trusted host (manager.go).
	mgr *mgrproto.Client
	mgrState

	mu        sync.Mutex
	st        *state
	providers map[string]*kms.Provider
	source    map[string]string // provider name -> "config" | "api"
	keyErrs   map[keys.KeyRef]string
	vmLocks   vmLocks
	metrics   *metrics
	mounts    map[string]*activeMount  // by mountpoint
	exports   map[string]*activeExport // NBD exports, by listener (export.go)
	stopping  bool                     // shutdown began: no new views
	serving   bool                     // Run is serving (a reload manages the metrics listener)
	// metricsSrv is the running metrics listener (nil when off); a
	// reload that changes metrics_listen replaces it (metrics.go).
	metricsSrv *metricsListener
	reading    map[string]bool            // VM dirs whose status read has not returned (see registerDatastoreVMs)
	made       map[string]*view.MadeFiles // disks made through views, by datastore root
	ops        sync.WaitGroup             // conversions in progress
}

// HardenProcess makes the process undumpable (no core dumps, no ptrace
// by other users, /proc/PID/mem closed) and sets RLIMIT_CORE to 0. Key
// material lives in mlock'ed memory (internal/secmem), so it never reaches
// swap either.
func HardenProcess() error {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_DUMPABLE, 0): %w", err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{}); err != nil {
		return fmt.Errorf("setrlimit(RLIMIT_CORE, 0): %w", err)
	}
	return nil
}

// New prepares a daemon: reads state, builds providers, opens the audit
// log. It does not listen or fetch keys yet.
func New(opts Options) (*Daemon, error) {
	cfg := opts.Config
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.RetryInterval == 0 {
		opts.RetryInterval = 10 * time.Second
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(cfg.AuditLog), 0o700); err != nil {
		return nil, fmt.Errorf("audit log dir: %w", err)
	}
	st, err := loadState(filepath.Join(cfg.StateDir, "state.json"))
	if err != nil {
		return nil, err
	}
	auth, err := newAuthorizer(cfg.Roles)
	if err != nil {
		return nil, err
	}
	audit, err := openAudit(cfg.AuditLog)
	if err != nil {
		return nil, err
	}
	d := &Daemon{
		cfgPath: opts.ConfigPath, log: opts.Logger, version: opts.Version, readTimeout: 30 * time.Second, retryReset: make(chan struct{}, 1),
		auth: auth, audit: audit, keyring: keys.NewKeyring(), started: time.Now(),
		st: st, providers: map[string]*kms.Provider{}, source: map[string]string{},
		keyErrs: map[keys.KeyRef]string{}, mounts: map[string]*activeMount{}, exports: map[string]*activeExport{},
	}
	d.conf.Store(cfg)
	d.retry.Store(int64(opts.RetryInterval))
	d.metrics = newMetrics(d)
	if cfg.Manager != nil {
		if err := d.useManager(*cfg.Manager); err != nil {
			d.Close()
			return nil, err
		}
	}
	for _, kc := range cfg.KMS {
		if err := d.addProviderLocked(kc, "config"); err != nil {
			d.Close()
			return nil, err
		}
	}
	for _, kc := range st.Providers {
		if err := d.addProviderLocked(kc, "api"); err != nil {
			d.Close()
			return nil, err
		}
	}
	return d, nil
}

// config is the running configuration. Callers that read several fields
// that must agree take one snapshot and read it.
func (d *Daemon) config() *config.Config { return d.conf.Load() }

func (d *Daemon) statePath() string { return filepath.Join(d.config().StateDir, "state.json") }

func (d *Daemon) addProviderLocked(kc kms.Config, source string) error {
	if d.mgr != nil {
		return badRequest("this host's key source is the manager at %s ([manager] in its config): it holds no KMS credentials; add key providers on the manager", d.mgr.Address())
	}
	if _, dup := d.providers[kc.Name]; dup {
		return fmt.Errorf("key provider %q already exists", kc.Name)
	}
	p, err := kms.New(kc, d.log.With("provider", kc.Name))
	if err != nil {
		return fmt.Errorf("key provider %q: %w", kc.Name, err)
	}
	d.providers[kc.Name] = p
	d.source[kc.Name] = source
	d.keyring.SetProvider(kc.Name, p)
	return nil
}

func (d *Daemon) defaultProvider() string {
	if d.st.DefaultProvider != "" {
		return d.st.DefaultProvider
	}
	if cfg := d.config(); cfg.DefaultProvider == "" && d.mgr != nil {
		return d.mgr.LastHello().DefaultProvider
	}
	return d.config().DefaultProvider
}

// neededKeys lists every KEK the registered state refers to.
func (d *Daemon) neededKeys() []keys.KeyRef {
	d.mu.Lock()
	defer d.mu.Unlock()
	seen := map[keys.KeyRef]bool{}
	var out []keys.KeyRef
	add := func(k keyRefJSON) {
		r := keys.KeyRef{Provider: k.Provider, KeyID: k.KeyID}
		if !seen[r] {
			seen[r] = true
			out = append(out, r)
		}
	}
	if d.st.HostKey != nil {
		add(*d.st.HostKey)
	}
	for _, vm := range d.st.VMs {
		for _, k := range vm.Keys {
			add(k)
		}
	}
	return out
}

// loadKeys fetches every needed KEK that is not cached, at most four at a
// time, and records per-key errors for status. The keyring de-duplicates
// concurrent fetches of one key.
func (d *Daemon) loadKeys(ctx context.Context) {
	if d.keyring.Locked() {
		if d.mgr != nil {
			d.heartbeat(ctx) // the manager sees the host (holding nothing)
		}
		return // vmcryptd lock: nothing is fetched until unlock (lock.go)
	}
	if d.mgr != nil {
		d.heartbeat(ctx) // before the keys: tells the manager what is missing
		defer d.syncRegistrations(ctx)
		if d.keyring.Locked() {
			return // the hello said the manager locked this host
		}
	}
	var refs []keys.KeyRef
	for _, ref := range d.neededKeys() {
		if !d.keyring.Cached(ref) && !d.deniedRecently(ref) {
			refs = append(refs, ref)
		}
	}
	// One key server that ignores its deadline costs its slot, never
	// the other keys or the retry loop.
	eachBounded(ctx, refs, 4, keyFetchTimeout+5*time.Second, func(ref keys.KeyRef) {
		fctx, cancel := context.WithTimeout(ctx, keyFetchTimeout)
		defer cancel()
		kek, err := d.keyring.Get(fctx, ref)
		if err == nil && !kek.MemoryLocked() {
			d.log.Warn("key memory is not mlock'ed (raise RLIMIT_MEMLOCK); it could reach swap", "key", ref.String())
		}
		d.mu.Lock()
		if err != nil {
			d.keyErrs[ref] = err.Error()
		} else {
			delete(d.keyErrs, ref)
		}
		d.mu.Unlock()
		d.noteDenied(ref, err)
		if err != nil {
			d.log.Warn("key not available", "key", ref.String(), "err", err)
		} else {
			d.log.Info("key loaded", "key", ref.String())
			d.noteKeyLoaded(ref, kek)
		}
	}, func(ref keys.KeyRef) {
		d.log.Warn("key fetch still running past its deadline; not waiting for it", "key", ref.String())
	})
}

// Run listens on the configured socket and serves until ctx is done, then
// shuts down: stops serving, zeroes every key, closes providers.
func (d *Daemon) Run(ctx context.Context) (err error) {
	gid := -1
	if g := d.config().SocketGroup; g != "" {
		if gid, err = lookupGroup(g); err != nil {
			return err
		}
	}
	ln, err := listenSocket(d.config().Socket, gid)
	if err != nil {
		return err
	}
	// Anyone in the socket's group can connect: every connection is
	// accepted at once and admitted or refused by its peer's quota (see
	// admit), so no user can queue root or Administrators behind theirs.
	track := newConnTracker(defaultLimits)
	ln = newAdmitListener(ln, track, newClassCache(d.auth).classify, d.log)
	srv := &http.Server{
		Handler: admitRequests(track, d.routes()),
		// A client that sends nothing, trickles its headers or idles on
		// a kept-alive connection loses it within seconds.
		ReadHeaderTimeout: 5 * time.Second,
		// Covers reading the request body; op lifts it once the body is
		// read (see there), so responses may stream for as long as needed.
		ReadTimeout:    30 * time.Second,
		IdleTimeout:    5 * time.Second,
		MaxHeaderBytes: 64 << 10,
		ConnContext:    connContext,
		ErrorLog:       slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
	}
	d.log.Info("vmcryptd serving", "socket", d.config().Socket, "pid", os.Getpid())

	bg, cancelBG := context.WithCancel(ctx)
	var bgWG sync.WaitGroup
	bgWG.Add(2)
	if d.mgr != nil {
		bgWG.Add(1)
		go func() {
			defer bgWG.Done()
			d.watchManager(bg)
		}()
	}
	// Start-up mounts and the key-retry loop run apart, so neither a
	// stuck mount nor a stuck key server holds up the other.
	go func() {
		defer bgWG.Done()
		d.restoreMounts(bg)
		d.restoreExports(bg)
		d.ready.Store(true)
		d.notifyReady() // systemd Type=notify: API listening, mounts restored
	}()
	go func() {
		defer bgWG.Done()
		d.loadKeys(bg)
		for {
			// Re-armed each round: a reload may change the interval.
			t := time.NewTimer(time.Duration(d.retry.Load()))
			select {
			case <-bg.Done():
				t.Stop()
				return
			case <-d.retryReset:
				t.Stop()
				d.loadKeys(bg)
			case <-t.C:
				d.loadKeys(bg)
			}
		}
	}()

	if addr := d.config().MetricsListen; addr != "" {
		// Bound before the API answers, so a scraper started after the
		// daemon reports ready finds it, and a taken port is logged at
		// once.
		if ml, err := d.listenMetrics(addr); err != nil {
			d.log.Error("metrics listener failed", "addr", addr, "err", err)
		} else {
			d.mu.Lock()
			d.metricsSrv = ml
			d.mu.Unlock()
		}
	}
	d.mu.Lock()
	d.serving = true
	d.mu.Unlock()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	d.shutdown(srv, cancelBG, &bgWG)
	d.log.Info("vmcryptd stopped; keys zeroed")
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// keyFetchTimeout bounds fetching one KEK.
const keyFetchTimeout = 30 * time.Second

// shutdown stops the daemon within bounded time whatever is stuck: it
// stops serving, gives background work and conversions a few seconds
// (conversions are resumable: one cut short is finished by the next run
// of its command), force-unmounts every view, removes the socket and
// zeroes the keys. Work that is still running is left to die with the
// process; a key it reaches for afterwards is destroyed and refuses.
func (d *Daemon) shutdown(srv *http.Server, cancelBG context.CancelFunc, bgWG *sync.WaitGroup) {
	cancelBG()
	sctx, cancel := context.WithTimeout(context.Background(), shutdownHTTP)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		d.log.Warn("API requests still running at shutdown; closing their connections", "err", err)
		srv.Close()
	}
	// A reload (SIGHUP) still running finishes first, and none starts
	// after: none may mount a view or bind a listener behind the
	// unmount below. Never unlocked: the daemon is ending.
	d.reloadMu.Lock()
	d.mu.Lock()
	d.stopping = true
	d.serving = false
	d.mu.Unlock()
	if !waitBounded(shutdownWork, func() { bgWG.Wait(); d.ops.Wait() }) {
		d.log.Warn("start-up mounts, key fetches or conversions still running at shutdown; not waiting for them (a conversion resumes when its command is run again)")
	}
	for _, err := range d.suspendExports("daemon stopped") {
		d.log.Error("NBD export at shutdown", "err", err)
	}
	d.unmountAll()
	d.mu.Lock()
	ml := d.metricsSrv
	d.metricsSrv = nil
	d.mu.Unlock()
	ml.stop()
	os.Remove(d.config().Socket)
	d.Close()
}

// Close zeroes every key and releases resources. Run calls it.
func (d *Daemon) Close() {
	d.keyring.Close()
	d.mu.Lock()
	providers := make([]*kms.Provider, 0, len(d.providers))
	for _, p := range d.providers {
		providers = append(providers, p)
	}
	d.mu.Unlock()
	if !waitBounded(shutdownProviders, func() {
		for _, p := range providers {
			p.Close()
		}
	}) {
		d.log.Warn("key provider connections did not close in time")
	}
	if d.audit != nil {
		d.audit.close()
	}
}

// listenSocket creates the socket's directory (0750), removes a stale
// socket left by a killed daemon (but not a live one), listens, and sets
// the socket to 0660.
func listenSocket(path string, gid int) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	if gid >= 0 {
		// Only a directory we own gets re-grouped; never a shared one like /tmp.
		if st, err := os.Stat(dir); err == nil && st.Mode().Perm()&0o002 == 0 {
			if err := os.Chown(dir, -1, gid); err != nil {
				return nil, fmt.Errorf("socket dir %s: %w", dir, err)
			}
		}
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("socket %s: another vmcryptd is already serving it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("socket %s: remove stale: %w", path, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("socket %s: %w", path, err)
		}
	}
	return ln, nil
}

func lookupGroup(g string) (int, error) {
	if n, err := strconv.Atoi(g); err == nil {
		return n, nil
	}
	gr, err := user.LookupGroup(g)
	if err != nil {
		return 0, fmt.Errorf("socket_group %q: %w", g, err)
	}
	return strconv.Atoi(gr.Gid)
}

type peerKey struct{}

// peerContext records the connecting process's uid (SO_PEERCRED) in the
// request context; the kernel vouches for it, so it cannot be forged.
func peerContext(ctx context.Context, c net.Conn) context.Context {
	uid, err := peerUID(c)
	if err != nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, uid)
}

func (d *Daemon) status(id identity) api.Status {
	s := api.Status{
		Version: d.version, PID: os.Getpid(), Started: d.started,
		Caller:     api.Caller{UID: id.UID, User: id.User, Role: id.Role, Privileges: d.auth.privileges(id.Role)},
		CachedKeys: len(d.keyring.Refs()),
		KeysLocked: d.keyring.AllMemoryLocked(),
		Locked:     d.keyring.Locked(),
		Ready:      d.ready.Load(),
		VMs:        []api.VMLockState{},
		Providers:  []api.ProviderInfo{},
		Datastores: []api.DatastoreState{},
		Mounts:     d.mountInfos(),
		Exports:    d.exportInfos(),
	}
	if d.metrics != nil {
		s.ViewLatency = d.metrics.view.summary()
	}
	d.statusMemory(&s)
	// Journals are read without the daemon lock: file I/O must not stall
	// the views' key lookups (they take the lock for KeyErr).
	registered := map[string]bool{}
	interrupted := func(dir string) string {
		if op, err := vm.InterruptedOp(dir); err == nil && op != "" {
			return "conversion interrupted (" + string(op) + "): run 'vmcryptd vm " + verbFor(op) + "' again to finish"
		}
		return ""
	}
	for i := range s.VMs {
		registered[s.VMs[i].Dir] = true
		s.VMs[i].State = interrupted(s.VMs[i].Dir)
	}
	for _, ds := range d.config().Datastores {
		s.Datastores = append(s.Datastores, api.DatastoreState{Name: ds.Name, Path: ds.Path})
		// A conversion killed before the VM was registered is found by its
		// journal in the datastore.
		ents, _ := os.ReadDir(ds.Path)
		for _, e := range ents {
			dir := filepath.Join(ds.Path, e.Name())
			if !e.IsDir() || registered[dir] {
				continue
			}
			if st := interrupted(dir); st != "" {
				s.VMs = append(s.VMs, api.VMLockState{Dir: dir, Keys: []string{}, State: st})
			}
		}
	}
	return s
}

// statusMemory fills the parts of s that come from the daemon's memory.
func (d *Daemon) statusMemory(s *api.Status) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s.DefaultKMS = d.defaultProvider()
	s.KeySource = d.keySource()
	if h := d.st.HostKey; h != nil {
		ref := keys.KeyRef{Provider: h.Provider, KeyID: h.KeyID}
		s.HostEncryption = api.HostEncryption{Enabled: true, Provider: h.Provider, KeyID: h.KeyID,
			KeyLoaded: d.keyring.Cached(ref), Error: d.keyErrs[ref]}
	}
	for name, p := range d.providers {
		s.Providers = append(s.Providers, api.ProviderInfo{Name: name, Servers: p.Servers(),
			Default: name == d.defaultProvider(), Source: d.source[name]})
	}
	sort.Slice(s.Providers, func(i, j int) bool { return s.Providers[i].Name < s.Providers[j].Name })
	for _, vm := range d.st.VMs {
		vs := api.VMLockState{Dir: vm.Dir, Name: vm.Name, Keys: []string{}}
		var refs []keys.KeyRef
		for _, k := range vm.Keys {
			ref := keys.KeyRef{Provider: k.Provider, KeyID: k.KeyID}
			refs = append(refs, ref)
			vs.Keys = append(vs.Keys, ref.String())
			if !d.keyring.Cached(ref) {
				vs.Locked = true
				reason := d.keyErrs[ref]
				if reason == "" {
					reason = "key " + ref.String() + " not fetched yet"
				}
				vs.Reason = reason
			}
		}
		vs.Warning = revokedWarning(d.keyring, refs)
		s.VMs = append(s.VMs, vs)
	}
}

func verbFor(op vm.Op) string {
	if op == vm.OpRekeyDeep {
		return "rekey --deep"
	}
	return string(op)
}

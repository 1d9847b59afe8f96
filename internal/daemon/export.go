package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/nbd"
)

// NBD exports: a virtual disk of a datastore served decrypted over NBD
// (internal/nbd) on a unix socket, or on TCP with mutual TLS. The disk's
// files are opened through view.Datastore like a view's, so the same
// trust rules and the same exclusion with conversions apply: an export
// is refused while its VM converts (Datastore.Busy), and a conversion is
// refused while an export holds its VM's files (openFilesUnder).

type exportRecord struct {
	Disk     string `json:"disk"`
	Unix     string `json:"unix,omitempty"`
	TCP      string `json:"tcp,omitempty"`
	Name     string `json:"name,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
	TLSCert  string `json:"tls_cert,omitempty"`
	TLSKey   string `json:"tls_key,omitempty"`
	TLSCA    string `json:"tls_ca,omitempty"`
	// Owner is the uid a unix socket is handed to (root: 0).
	Owner int `json:"owner,omitempty"`
}

// key identifies an export by its listener.
func (r exportRecord) key() string {
	if r.Unix != "" {
		return "unix:" + r.Unix
	}
	return "tcp:" + r.TCP
}

func (r exportRecord) uri() string {
	if r.Unix != "" {
		return "nbd+unix:///" + r.Name + "?socket=" + r.Unix
	}
	return "nbds://" + r.TCP + "/" + r.Name
}

type activeExport struct {
	rec      exportRecord
	ds       *view.Datastore
	disk     *view.BlockDisk
	srv      *nbd.Server
	ln       net.Listener
	starting bool   // reserved: its files are being opened
	err      string // not serving: why (a restore that failed, a lock)
}

// exportListenRule checks where an export may listen: exactly one of a
// unix socket and a TCP address; TCP only with mutual TLS (certificate,
// key and client CA), since anyone who reaches the port would read the
// decrypted disk; TLS files only for TCP. "" allows.
func exportListenRule(unixPath, tcp string, cert, key, ca string) string {
	tlsAny := cert != "" || key != "" || ca != ""
	tlsAll := cert != "" && key != "" && ca != ""
	switch {
	case (unixPath == "") == (tcp == ""):
		return "give exactly one of --unix PATH and --tcp HOST:PORT"
	case unixPath != "" && !filepath.IsAbs(unixPath):
		return "the unix socket path must be absolute"
	case unixPath != "" && tlsAny:
		return "TLS is for --tcp; a unix socket is protected by its file mode"
	case tcp != "" && !tlsAll:
		return "--tcp needs mutual TLS: --tls-cert, --tls-key and --tls-ca (plain TCP would give the decrypted disk to anyone who reaches the port)"
	}
	return ""
}

// exportTLS is the server side of an export's mutual TLS: TLS 1.2 or
// later, a client certificate chaining to ca required.
func exportTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate %s / key %s: %w", certFile, keyFile, err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("TLS CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("TLS CA %s: no PEM certificate in it", caFile)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// blockBackend adapts an view.BlockDisk to nbd.Backend.
type blockBackend struct{ *view.BlockDisk }

func (b blockBackend) Trim(off, n int64) error { return b.Zero(off, n, true) }

func (b blockBackend) Extents(off, n int64) ([]nbd.Extent, error) {
	runs, err := b.Map(off, n)
	if err != nil {
		return nil, err
	}
	out := make([]nbd.Extent, len(runs))
	for i, r := range runs {
		out[i] = nbd.Extent{Length: r.Length}
		if r.Zero {
			out[i].Flags = nbd.StateHole | nbd.StateZero
		}
	}
	return out, nil
}

// exportDisk resolves a request's disk: an absolute .vmdk path inside a
// configured datastore (any directory when none is configured), and the
// datastore root its files are resolved under.
func (d *Daemon) exportDisk(p string) (disk, root string, err error) {
	if !filepath.IsAbs(p) {
		return "", "", badRequest("disk must be an absolute path, got %q", p)
	}
	dir, err := d.vmDir(filepath.Dir(p))
	if err != nil {
		return "", "", err
	}
	disk = filepath.Join(dir, filepath.Base(p))
	if !strings.EqualFold(filepath.Ext(disk), ".vmdk") {
		return "", "", badRequest("%s is not a .vmdk disk", disk)
	}
	st, err := os.Lstat(disk)
	if err != nil {
		return "", "", badRequest("disk %s: %v", disk, err)
	}
	if !st.Mode().IsRegular() {
		return "", "", badRequest("disk %s is not a regular file", disk)
	}
	root = filepath.Dir(dir)
	for _, ds := range d.config().Datastores {
		r, err := filepath.EvalSymlinks(ds.Path)
		if err == nil && strings.HasPrefix(dir, r+"/") {
			root = r
		}
	}
	return disk, root, nil
}

// startExport opens the disk and starts serving rec. A reserved entry is
// made first, so a conversion that starts meanwhile either finds it
// (openFilesUnder) or has made the open fail (Busy).
func (d *Daemon) startExport(ctx context.Context, rec exportRecord) (*activeExport, error) {
	if msg := exportListenRule(rec.Unix, rec.TCP, rec.TLSCert, rec.TLSKey, rec.TLSCA); msg != "" {
		return nil, badRequest("%s", msg)
	}
	// Shared from the datastore check to the export's registration below
	// (see Daemon.servedMu).
	d.servedMu.RLock()
	registered := false
	defer func() {
		if !registered {
			d.servedMu.RUnlock()
		}
	}()
	disk, root, err := d.exportDisk(rec.Disk)
	if err != nil {
		return nil, err
	}
	rec.Disk = disk
	var tlsCfg *tls.Config
	if rec.TCP != "" {
		if tlsCfg, err = exportTLS(rec.TLSCert, rec.TLSKey, rec.TLSCA); err != nil {
			return nil, badRequest("%v", err)
		}
	}
	ae := &activeExport{rec: rec, starting: true}
	d.mu.Lock()
	if d.stopping {
		d.mu.Unlock()
		return nil, conflict("the daemon is stopping: not exporting %s", disk)
	}
	if old, ok := d.exports[rec.key()]; ok && old.err == "" {
		d.mu.Unlock()
		return nil, conflict("%s already serves %s", rec.key(), old.rec.Disk)
	}
	for _, e := range d.exports {
		if e.rec.Disk == disk && e.err == "" {
			d.mu.Unlock()
			return nil, conflict("%s is already exported on %s", disk, e.rec.key())
		}
	}
	d.exports[rec.key()] = ae
	d.mu.Unlock()
	registered = true
	d.servedMu.RUnlock()
	fail := func(err error) (*activeExport, error) {
		d.mu.Lock()
		if d.exports[rec.key()] == ae {
			delete(d.exports, rec.key())
		}
		d.mu.Unlock()
		d.stopExport(ae, "")
		return nil, err
	}
	if st, err := vm.ReadVMStatus(filepath.Dir(disk), d.config().CoreDumpPatterns); err == nil && st.Encrypted {
		if err := d.registerVM(st, ""); err != nil {
			d.log.Warn("register VM", "dir", st.Dir, "err", err)
		}
	}
	d.loadKeys(ctx)
	ds, err := d.newDatastore(root)
	if err != nil {
		return fail(err)
	}
	d.mu.Lock()
	ae.ds = ds
	d.mu.Unlock()
	rel, _ := filepath.Rel(root, disk)
	bd, err := ds.OpenBlockDisk(filepath.ToSlash(rel), rec.ReadOnly)
	if err != nil {
		if errors.Is(err, view.ErrBusy) {
			return fail(conflict("%v", err))
		}
		return fail(badRequest("%v", err))
	}
	d.mu.Lock()
	ae.disk = bd
	d.mu.Unlock()
	var ln net.Listener
	if rec.Unix != "" {
		ln, err = listenExportSocket(rec.Unix, rec.Owner)
	} else {
		ln, err = net.Listen("tcp", rec.TCP)
	}
	if err != nil {
		return fail(badRequest("export %s: %v", rec.key(), err))
	}
	srv := nbd.NewServer(nbd.Config{
		Export: &nbd.Export{Name: rec.Name, Description: "vmcryptd " + disk, Backend: blockBackend{bd}},
		TLS:    tlsCfg,
		Log:    d.log.With("export", rec.key()),
	})
	d.mu.Lock()
	ae.ln, ae.srv, ae.starting = ln, srv, false
	d.mu.Unlock()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			d.log.Error("NBD export stopped serving", "export", rec.key(), "err", err)
		}
	}()
	d.log.Info("NBD export started", "disk", disk, "listen", rec.key(), "name", rec.Name, "read_only", bd.ReadOnly(), "size", bd.Size())
	return ae, nil
}

// listenExportSocket creates the unix socket at path with mode 0600
// owned by uid: made in a fresh private directory beside it and renamed
// into place, so no one connects before its mode is set. A stale socket
// (nobody listening) is replaced; anything else there is refused.
func listenExportSocket(path string, uid int) (net.Listener, error) {
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: something is listening there already", path)
		}
	}
	tmp, err := os.MkdirTemp(filepath.Dir(path), ".vmcryptd-nbd-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	p := filepath.Join(tmp, "s")
	ln, err := net.Listen("unix", p)
	if err != nil {
		return nil, err
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	err = os.Chmod(p, 0o600)
	if err == nil && uid != 0 {
		err = os.Lchown(p, uid, -1)
	}
	if err == nil {
		err = os.Rename(p, path)
	}
	if err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// stopExport ends an export: listener, connections (in-flight requests
// finish first), then the disk's files (flushed; keys zeroed). reason,
// when set, keeps it listed as not serving.
func (d *Daemon) stopExport(ae *activeExport, reason string) error {
	d.mu.Lock()
	srv, ln, disk, ds := ae.srv, ae.ln, ae.disk, ae.ds
	ae.srv, ae.ln, ae.disk, ae.ds = nil, nil, nil, nil
	ae.err = reason
	d.mu.Unlock()
	var errs []error
	if srv != nil {
		srv.Close()
	}
	if ln != nil && ae.rec.Unix != "" {
		os.Remove(ae.rec.Unix)
	}
	if disk != nil {
		errs = append(errs, disk.Close())
	}
	if ds != nil {
		ds.Close()
	}
	return errors.Join(errs...)
}

func (d *Daemon) saveExports() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	recs := []exportRecord{}
	for _, e := range d.exports {
		if !e.starting {
			recs = append(recs, e.rec)
		}
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].key() < recs[j].key() })
	old := d.st.Exports
	d.st.Exports = recs
	if err := d.st.save(d.statePath()); err != nil {
		d.st.Exports = old
		return err
	}
	return nil
}

// findExport resolves `export stop`'s target: a socket path, a TCP
// address, an export name or a disk path.
func (d *Daemon) findExport(target string) (*activeExport, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var found []*activeExport
	for _, e := range d.exports {
		r := e.rec
		if r.Unix == target || r.TCP == target || (r.Name != "" && r.Name == target) || r.Disk == target || r.key() == target {
			found = append(found, e)
		}
	}
	switch len(found) {
	case 0:
		return nil, notFound("no NBD export %q", target)
	case 1:
		if found[0].starting {
			return nil, conflict("export %s is still starting", found[0].rec.key())
		}
		return found[0], nil
	}
	return nil, conflict("%q names %d exports: give the socket path or TCP address", target, len(found))
}

func (d *Daemon) exportInfo(e *activeExport) api.ExportInfo {
	info := api.ExportInfo{Name: e.rec.Name, Disk: e.rec.Disk, Unix: e.rec.Unix, TCP: e.rec.TCP, ReadOnly: e.rec.ReadOnly, URI: e.rec.uri(), Error: e.err}
	if e.disk != nil {
		info.Size, info.CreateType, info.ReadOnly = e.disk.Size(), e.disk.CreateType(), e.disk.ReadOnly()
	}
	if e.srv != nil {
		info.Connections = e.srv.Conns()
	}
	if e.starting {
		info.Error = "starting"
	}
	return info
}

func (d *Daemon) exportInfos() []api.ExportInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := []api.ExportInfo{}
	for _, e := range d.exports {
		out = append(out, d.exportInfo(e))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].URI < out[j].URI })
	return out
}

// exportedFilesUnder lists files of dir held by exports (also those
// still starting), for the in-use checks of conversions. Called with
// d.mu held.
func (d *Daemon) exportedFilesUnderLocked(dir string) []string {
	var out []string
	for _, e := range d.exports {
		if e.err != "" {
			continue
		}
		if e.starting {
			if p := e.rec.Disk; filepath.Dir(p) == dir || strings.HasPrefix(p, dir+"/") {
				out = append(out, fmt.Sprintf("%s (NBD export %s, starting)", p, e.rec.key()))
			}
			continue
		}
		if e.disk == nil {
			continue
		}
		for _, f := range e.disk.Files() {
			if strings.HasPrefix(f, dir+"/") {
				out = append(out, fmt.Sprintf("%s (NBD export %s)", f, e.rec.key()))
			}
		}
	}
	return out
}

type exportResult struct{ api.ExportInfo }

func (e exportResult) audit() (string, []string) {
	return e.Disk + " on " + strings.TrimPrefix(e.URI, "nbd+unix://"), nil
}

func (d *Daemon) hExportStart(rc *reqCtx) (any, error) {
	var req api.ExportRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	rec := exportRecord{Disk: req.Disk, Unix: filepath.Clean(req.Unix), TCP: req.TCP, Name: req.Name, ReadOnly: req.ReadOnly, TLSCert: req.TLSCert, TLSKey: req.TLSKey, TLSCA: req.TLSCA, Owner: rc.id.UID}
	if req.Unix == "" {
		rec.Unix = ""
	}
	if len(rec.Name) > 4096 {
		return nil, badRequest("export name longer than 4096 bytes")
	}
	if rc.id.UID != 0 && rec.Unix != "" {
		// The daemon creates the socket as root: only in a directory no
		// one but root can change (as for view mountpoints).
		if err := d.exportSocketAllowed(rec.Unix); err != nil {
			return nil, err
		}
	}
	ae, err := d.startExport(rc.r.Context(), rec)
	if err != nil {
		return nil, err
	}
	if err := d.saveExports(); err != nil {
		return nil, err
	}
	d.mu.Lock()
	info := d.exportInfo(ae)
	d.mu.Unlock()
	return exportResult{info}, nil
}

// exportSocketAllowed keeps callers other than root to sockets directly
// inside a configured mount root.
func (d *Daemon) exportSocketAllowed(p string) error {
	parent := filepath.Dir(p)
	for _, r := range d.config().MountRoots {
		if filepath.Clean(r) == parent {
			if err := safeMountRoot(parent); err != nil {
				return forbidden("mount root %s: %v", parent, err)
			}
			return nil
		}
	}
	return forbidden("only root may create export sockets outside a configured mount root (%s)", strings.Join(d.config().MountRoots, ", "))
}

func (d *Daemon) hExportStop(rc *reqCtx) (any, error) {
	var req api.ExportStopRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	ae, err := d.findExport(req.Target)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	info := d.exportInfo(ae)
	delete(d.exports, ae.rec.key())
	d.mu.Unlock()
	serr := d.stopExport(ae, "stopped")
	if err := d.saveExports(); err != nil {
		return nil, err
	}
	if serr != nil {
		return exportResult{info}, fmt.Errorf("export %s stopped, but closing its files: %w", ae.rec.key(), serr)
	}
	d.log.Info("NBD export stopped", "disk", info.Disk, "listen", ae.rec.key())
	return exportResult{info}, nil
}

func (d *Daemon) hExportList(rc *reqCtx) (any, error) {
	return d.exportInfos(), nil
}

// restoreExports re-establishes remembered exports after a start (or
// an unlock); one that fails stays listed with its error.
func (d *Daemon) restoreExports(ctx context.Context) {
	d.mu.Lock()
	var recs []exportRecord
	for _, r := range d.st.Exports {
		if e, ok := d.exports[r.key()]; !ok || e.err != "" {
			recs = append(recs, r)
		}
	}
	d.mu.Unlock()
	for _, r := range recs {
		if _, err := d.startExport(ctx, r); err != nil {
			d.log.Error("NBD export not re-established", "disk", r.Disk, "listen", r.key(), "err", err)
			d.mu.Lock()
			if _, ok := d.exports[r.key()]; !ok {
				d.exports[r.key()] = &activeExport{rec: r, err: err.Error()}
			}
			d.mu.Unlock()
		}
	}
}

// suspendExports stops serving every export (keys locked, shutdown);
// they stay remembered and listed with the reason.
func (d *Daemon) suspendExports(reason string) []error {
	d.mu.Lock()
	var all []*activeExport
	for _, e := range d.exports {
		if !e.starting && e.err == "" {
			all = append(all, e)
		}
	}
	d.mu.Unlock()
	var errs []error
	for _, e := range all {
		if err := d.stopExport(e, reason); err != nil {
			errs = append(errs, fmt.Errorf("export %s: %w", e.rec.key(), err))
		}
	}
	return errs
}

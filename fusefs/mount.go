package fusefs

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// View is a served, mounted view. Create it with Mount, stop it with
// Unmount, and Wait for the server to finish. (Go does not allow a type
// and a function both named Mount in one package, hence the name.)
type View struct {
	st         *state
	server     *fuse.Server
	mountpoint string

	unmountMu sync.Mutex // one Unmount at a time
	done      chan struct{}
	closeOnce sync.Once
}

// state is what every node of one mount shares.
type state struct {
	root     string // absolute backing directory
	dev      uint64 // its device, folded out of inode numbers
	backend  Backend
	log      *slog.Logger
	obs      Observer // nil: nobody observes latencies
	readOnly bool
	// writeback mirrors Options: with the kernel writeback cache the
	// kernel may read through a write-only handle, so plain files are
	// opened O_RDWR instead.
	writeback bool
	// rootNode is the view's root inode; Lock walks the tree from it.
	rootNode *node

	mu     sync.Mutex
	nextID uint64
	open   map[uint64]*node // open file handles, for Unmount's refusal
}

func (s *state) addHandle(n *node) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextID++
	s.open[s.nextID] = n
	return s.nextID
}

func (s *state) dropHandle(id uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.open, id)
}

// isOpen reports whether the file at rel has an open handle.
func (s *state) isOpen(rel string) bool {
	s.mu.Lock()
	nodes := make([]*node, 0, len(s.open))
	for _, n := range s.open {
		nodes = append(nodes, n)
	}
	s.mu.Unlock()
	for _, n := range nodes {
		if n.rel() == rel {
			return true
		}
	}
	return false
}

// openPaths lists the files with open handles, sorted, each once.
func (s *state) openPaths() []string {
	s.mu.Lock()
	nodes := make([]*node, 0, len(s.open))
	for _, n := range s.open {
		nodes = append(nodes, n)
	}
	s.mu.Unlock()
	seen := map[string]bool{}
	var out []string
	for _, n := range nodes {
		p := n.Path(nil)
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	sort.Strings(out)
	return out
}

// Mount serves the datastore directory root at mountpoint. It mounts
// with the mount(2) system call (DirectMount) and returns once the kernel
// has accepted the mount.
func Mount(root, mountpoint string, b Backend, opts Options) (*View, error) {
	if b == nil {
		return nil, errors.New("fusefs: mount: nil backend")
	}
	absRoot, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount %s: %w", root, err)
	}
	var rootSt syscall.Stat_t
	if err := syscall.Stat(absRoot, &rootSt); err != nil {
		return nil, fmt.Errorf("fusefs: mount: datastore %s: %w", absRoot, err)
	}
	if rootSt.Mode&syscall.S_IFMT != syscall.S_IFDIR {
		return nil, fmt.Errorf("fusefs: mount: datastore %s is not a directory", absRoot)
	}
	absMP, err := filepath.Abs(mountpoint)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	if _, err := CleanupStale(absMP); err != nil {
		return nil, err
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	logger = logger.With("component", "fusefs", "mountpoint", absMP)

	st := &state{
		root:      absRoot,
		dev:       uint64(rootSt.Dev),
		backend:   b,
		log:       logger,
		obs:       opts.Observer,
		readOnly:  opts.ReadOnly,
		writeback: !opts.NoWritebackCache && !opts.ReadOnly,
		open:      map[uint64]*node{},
	}
	rootNode := &node{st: st}
	st.rootNode = rootNode

	timeout := func(d time.Duration) *time.Duration {
		switch {
		case d == 0:
			d = defaultTimeout
		case d < 0:
			d = 0
		}
		return &d
	}
	mo := fuse.MountOptions{
		AllowOther:  opts.AllowOther,
		FsName:      absRoot,
		Name:        "vmcryptd",
		DirectMount: true,
		// The kernel checks modes against the attributes we report, so a
		// non-root user (AllowOther) gets no more than the backing files
		// grant; without it every request would run with root's rights.
		Options:                 []string{"default_permissions"},
		MaxWrite:                opts.MaxWrite,
		MaxBackground:           opts.MaxBackground,
		CongestionThreshold:     opts.CongestionThreshold,
		MaxReadAhead:            opts.MaxReadAhead,
		MaxInflightRequestBytes: opts.MaxInflightBytes,
		Debug:                   opts.Debug,
		// go-fuse logs its own warnings here, and every request when
		// Debug is set.
		Logger: slog.NewLogLogger(logger.Handler(), fuseLogLevel(opts.Debug)),
		// go-fuse tries splice for every READ reply and only then
		// notices that decrypted data (a byte slice) cannot be spliced:
		// a pipe round trip wasted per read (about 10% of the daemon's
		// CPU for 4 KiB reads). Plain files use passthrough instead.
		DisableSplice: true,
		// Mapping a file opened O_DIRECT shared stays possible.
		ExtraCapabilities: fuse.CAP_DIRECT_IO_ALLOW_MMAP,
	}
	if mo.MaxWrite == 0 {
		mo.MaxWrite = DefaultMaxWrite
	}
	if mo.MaxBackground == 0 {
		mo.MaxBackground = DefaultMaxBackground
	}
	if mo.MaxInflightRequestBytes == 0 {
		mo.MaxInflightRequestBytes = DefaultMaxInflightBytes
	}
	if st.writeback {
		mo.ExtraCapabilities |= fuse.CAP_WRITEBACK_CACHE
	}
	if !opts.NoAsyncDIO {
		// The kernel then sends the requests of an asynchronous O_DIRECT
		// caller as background requests, many at once; Container locks
		// per unit range, so they run in parallel. Extending writes stay
		// synchronous in the kernel (fuse_direct_IO), which keeps the
		// size it caches right.
		mo.ExtraCapabilities |= fuse.CAP_ASYNC_DIO
	}
	if !opts.Passthrough || st.writeback {
		// Plain LoopbackFiles offer passthrough; turn it off for the mount
		// unless asked for (and possible).
		mo.DisabledCapabilities |= fuse.CAP_PASSTHROUGH
	}
	if !opts.XAttr {
		mo.DisableXAttrs = true
	}
	if opts.ReadOnly {
		mo.Options = append(mo.Options, "ro")
		mo.DirectMountFlags = syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_RDONLY
	}
	fsOpts := &fs.Options{
		MountOptions: mo,
		EntryTimeout: timeout(opts.EntryTimeout),
		AttrTimeout:  timeout(opts.AttrTimeout),
		// Negative lookups are not cached: files appear in the datastore
		// behind our back (the engine converts VMs while mounted).
		NegativeTimeout: timeout(-1),
		RootStableAttr:  &fs.StableAttr{Ino: 1},
	}
	server, err := fs.Mount(absMP, rootNode, fsOpts)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount %s on %s: %w", absRoot, absMP, err)
	}
	m := &View{st: st, server: server, mountpoint: absMP, done: make(chan struct{})}
	ra, ratio := opts.ReadAheadKB, opts.MaxDirtyRatio
	if ra == 0 {
		ra = DefaultReadAheadKB
	}
	if ratio == 0 {
		ratio = -1
	}
	if err := tuneBDI(absMP, ra, ratio); err != nil {
		// Slower, not wrong: keep serving.
		logger.Warn("cannot tune the mount's backing device info", "err", err)
	}
	go func() {
		server.Wait()
		m.finish()
	}()
	logger.Info("mounted", "datastore", absRoot, "writeback", st.writeback, "async_dio", !opts.NoAsyncDIO,
		"max_write", mo.MaxWrite, "max_background", mo.MaxBackground)
	return m, nil
}

// Mountpoint is where the view is mounted.
func (m *View) Mountpoint() string { return m.mountpoint }

// OpenFiles lists the paths (relative to the datastore) that have open
// handles.
func (m *View) OpenFiles() []string { return m.st.openPaths() }

// ErrBusy is returned (wrapped, with the paths) by Unmount when files are
// open and force is false.
var ErrBusy = errors.New("files are open")

// Unmount stops the view. With files open it refuses, listing them,
// unless force is set; force aborts the FUSE connection, so processes that
// still have files open get ENOTCONN, and detaches the mount.
func (m *View) Unmount(force bool) error {
	m.unmountMu.Lock()
	defer m.unmountMu.Unlock()
	select {
	case <-m.done:
		return nil
	default:
	}
	if !force {
		// close(2) returns before the kernel's asynchronous RELEASE
		// reaches us; give handles just closed a moment to drain.
		var open []string
		for deadline := time.Now().Add(500 * time.Millisecond); ; {
			open = m.st.openPaths()
			if len(open) == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if len(open) > 0 {
			return fmt.Errorf("fusefs: unmount %s: %w: %s", m.mountpoint, ErrBusy, strings.Join(open, ", "))
		}
		if err := m.server.Unmount(); err != nil {
			return fmt.Errorf("fusefs: unmount %s: %w", m.mountpoint, err)
		}
		<-m.done
		return nil
	}
	// MNT_FORCE makes the kernel abort the connection (fuse_umount_begin);
	// the umount itself may still fail with EBUSY while processes hold
	// files, so detach the mount from the namespace in that case.
	err := unix.Unmount(m.mountpoint, unix.MNT_FORCE)
	if err != nil {
		if derr := unix.Unmount(m.mountpoint, unix.MNT_DETACH); derr != nil && !errors.Is(derr, unix.EINVAL) {
			return fmt.Errorf("fusefs: force unmount %s: %w (detach: %v)", m.mountpoint, err, derr)
		}
	}
	select {
	case <-m.done:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("fusefs: force unmount %s: server did not stop", m.mountpoint)
	}
	return nil
}

// Wait blocks until the view is unmounted and every container it had
// open is closed.
func (m *View) Wait() { <-m.done }

// finish runs once the server loop has ended: containers whose RELEASE
// never came (forced unmount, killed clients) are closed so their headers
// are written and keys wiped.
func (m *View) finish() {
	m.closeOnce.Do(func() {
		m.st.mu.Lock()
		nodes := make([]*node, 0, len(m.st.open))
		for id, n := range m.st.open {
			nodes = append(nodes, n)
			delete(m.st.open, id)
		}
		m.st.mu.Unlock()
		for _, n := range nodes {
			n.closeContainer()
		}
		m.st.log.Info("unmounted")
		close(m.done)
	})
}

func fuseLogLevel(debug bool) slog.Level {
	if debug {
		return slog.LevelDebug
	}
	return slog.LevelWarn
}

// tuneBDI sets the FUSE mount's readahead window and dirty-page share in
// sysfs; values < 0 are left alone.
func tuneBDI(mountpoint string, readAheadKB, maxRatio int) error {
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return err
	}
	dir := fmt.Sprintf("/sys/class/bdi/%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev))
	var errs []error
	if readAheadKB >= 0 {
		errs = append(errs, os.WriteFile(filepath.Join(dir, "read_ahead_kb"), fmt.Appendf(nil, "%d", readAheadKB), 0))
	}
	if maxRatio >= 0 {
		errs = append(errs, os.WriteFile(filepath.Join(dir, "max_ratio"), fmt.Appendf(nil, "%d", maxRatio), 0))
	}
	return errors.Join(errs...)
}

// CleanupStale lazily unmounts mountpoint while it is a dead FUSE mount
// (its server is gone, so stat or statfs fails with ENOTCONN or
// ECONNABORTED, and
// /proc/self/mountinfo lists a fuse mount there), whatever process
// served it, leaving a directory that can be mounted on again. Stacked
// dead mounts are detached one after the other. A live mount, or a
// directory that is not a mount, is left alone; a disconnected path that
// is not a FUSE mount is refused. It reports whether it detached any.
func CleanupStale(mountpoint string) (bool, error) {
	for i := 0; ; i++ {
		if !disconnected(mountpoint) {
			return i > 0, nil
		}
		info, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			return false, fmt.Errorf("fusefs: %s is disconnected (its FUSE server is gone), and the mount table cannot be read: %w", mountpoint, err)
		}
		if !fuseMountAt(info, mountpoint) {
			return false, fmt.Errorf("fusefs: %s is disconnected (transport endpoint is not connected) but is not a FUSE mount: not touching it", mountpoint)
		}
		if i == 8 {
			return true, fmt.Errorf("fusefs: clean up stale mount %s: still disconnected after %d lazy unmounts", mountpoint, i)
		}
		if err := unix.Unmount(mountpoint, unix.MNT_DETACH); err != nil {
			return i > 0, fmt.Errorf("fusefs: clean up stale mount %s: %w", mountpoint, err)
		}
	}
}

// disconnected reports whether path is a mount whose FUSE server is gone:
// the kernel answers ENOTCONN, or ECONNABORTED once the connection was
// aborted (the server died, or someone wrote to its abort file). stat(2)
// may be answered from attributes the kernel still caches; statfs(2)
// always asks the server.
func disconnected(path string) bool {
	var sfs unix.Statfs_t
	_, err := os.Stat(path)
	if err == nil {
		err = unix.Statfs(path, &sfs)
	}
	return errors.Is(err, syscall.ENOTCONN) || errors.Is(err, syscall.ECONNABORTED)
}

// fuseMountAt reports whether the mount table (proc(5) mountinfo format)
// has a fuse or fuse.* mount at path.
func fuseMountAt(mountinfo []byte, path string) bool {
	path = filepath.Clean(path)
	for _, line := range strings.Split(string(mountinfo), "\n") {
		f := strings.Fields(line)
		// id parent maj:min root mountpoint options [optional...] - fstype source superopts
		if len(f) < 7 || unescapeMountinfo(f[4]) != path {
			continue
		}
		for j := 6; j+1 < len(f); j++ {
			if f[j] == "-" {
				if t := f[j+1]; t == "fuse" || t == "fuseblk" || strings.HasPrefix(t, "fuse.") {
					return true
				}
				break
			}
		}
	}
	return false
}

// unescapeMountinfo undoes the octal escapes (\040 for a space, ...) the
// kernel writes in mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

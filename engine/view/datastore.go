package view

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/xts"
	"github.com/vmcryptd/vmcryptd/formats/vmdir"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// Datastore resolves the files of a datastore directory for a decrypted
// view: which are containers, which DEK opens each, and whether that key
// can be had now. DEKs are unwrapped on first use and cached, in locked
// memory, until Close.
type Datastore struct {
	root string
	Keys *keys.Keyring
	impl xts.Impl
	// keyErr, if set, explains why a KEK is not in memory (the daemon's
	// last fetch error). The view never fetches keys itself: a file
	// lookup must not wait on a key server; the daemon's loader does.
	keyErr func(keys.KeyRef) string
	// busyFn, if set, reports whether path is, is inside, or holds a VM
	// directory in the middle of an operation that replaces its files
	// (encrypt, decrypt, deep rekey): opening, creating, renaming or
	// unlinking there is refused, so nothing is written to a file about
	// to be replaced or created in plain text beside its encrypted
	// siblings, and the directory is not moved from under the operation.
	busyFn func(path string) bool
	// corePatterns are extra file-name patterns of core dumps.
	corePatterns []string

	mu      sync.Mutex
	deks    map[dekKey]*keys.DEK
	layouts map[string]cachedLayout
	// pending holds the disks created through the view whose descriptor
	// is not settled yet, by descriptor path (see viewdisk.go).
	pending map[string]pendingDisk
	// kept remembers, by descriptor path, the container (file id) a
	// settle left encrypted, so opening it again does not make it
	// pending again (recoverPending) and re-run the same refusal.
	kept map[string][16]byte
	// made records every .vmdk container created through this resolver
	// (by inode and file id, so a rename keeps it): until a descriptor
	// names it, its header copy is its key, and only for files made so
	// (roleOf).
	made *MadeFiles
}

// DatastoreOptions configure a resolver. The zero value is a resolver
// with the best XTS implementation, no key-error explanations, nothing
// busy, the built-in core dump names and a set of made files of its own.
type DatastoreOptions struct {
	Impl xts.Impl
	// KeyErr explains why a KEK is not in memory (the daemon's last
	// fetch error), for refusals' reasons.
	KeyErr func(keys.KeyRef) string
	// Busy reports whether path is, is inside, or holds a VM directory
	// in the middle of an operation that replaces its files.
	Busy func(path string) bool
	// CoreDumpPatterns are extra file-name patterns of core dumps.
	CoreDumpPatterns []string
	// Made is the set of .vmdk containers made through views of this
	// datastore; a daemon shares one per datastore, so a remount still
	// knows the disks it made. nil: a set of this resolver's own.
	Made *MadeFiles
}

// MadeFiles is the set of containers a view created (see Datastore.Made).
// Memory only: after a restart such a disk must be attached to open.
type MadeFiles struct {
	mu sync.Mutex
	m  map[madeKey]struct{}
}

// NewMadeFiles returns an empty set.
func NewMadeFiles() *MadeFiles { return &MadeFiles{m: map[madeKey]struct{}{}} }

func (m *MadeFiles) add(k madeKey) {
	m.mu.Lock()
	m.m[k] = struct{}{}
	m.mu.Unlock()
}

func (m *MadeFiles) has(k madeKey) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.m[k]
	return ok
}

// cachedLayout is a VM directory's layout with a stamp of every file it
// was read from (the directory, the vmx, the snapshot database, each
// disk's descriptor): a view does not re-read them on each lookup of an
// encrypted file, but sees any change, in place (qemu-img, an editor,
// shell redirection) or by rename. Failed loads are not cached: a fix is
// seen at once, and a broken VM directory is refused meanwhile.
type cachedLayout struct {
	stamps []fileStamp
	l      *vm.Layout
}

// fileStamp identifies a file's content as of a stat: inode, size,
// modification and change time (a rename into place changes the inode,
// a write the times).
type fileStamp struct {
	path                string
	ino                 uint64
	size, mtime, ctimeN int64
}

func stampOf(p string) fileStamp {
	st := fileStamp{path: p}
	var s unix.Stat_t
	if err := unix.Lstat(p, &s); err == nil {
		st.ino, st.size = s.Ino, s.Size
		st.mtime, st.ctimeN = s.Mtim.Nano(), s.Ctim.Nano()
	}
	return st
}

func (c cachedLayout) fresh() bool {
	for _, st := range c.stamps {
		if stampOf(st.path) != st {
			return false
		}
	}
	return true
}

// Layout returns dir's layout, from the cache while none of its files
// changed.
func (d *Datastore) Layout(dir string) (*vm.Layout, error) {
	d.mu.Lock()
	c, ok := d.layouts[dir]
	d.mu.Unlock()
	if ok && c.fresh() {
		return c.l, nil
	}
	d.mu.Lock()
	delete(d.layouts, dir)
	d.mu.Unlock()
	// A file rewritten while it is read (in place, by qemu-img or an
	// editor) could give a torn layout whose stamps, taken after, look
	// current. So the layout is read twice: it is kept only if every
	// source's stamp after the first read still holds after the second.
	var prev *cachedLayout
	for attempt := 0; attempt < 4; attempt++ {
		l, err := vm.LoadLayout(dir, d.corePatterns)
		if err != nil {
			return nil, err
		}
		c := cachedLayout{stamps: []fileStamp{stampOf(dir)}, l: l}
		for _, p := range l.Sources {
			c.stamps = append(c.stamps, stampOf(p))
		}
		if prev != nil && slices.Equal(prev.stamps, c.stamps) {
			d.mu.Lock()
			d.layouts[dir] = c
			d.mu.Unlock()
			return l, nil
		}
		prev = &c
	}
	return nil, fmt.Errorf("%s: its files keep changing while being read", dir)
}

// placementLayout is the layout that decides where new files go: dir's
// full layout, or, when that cannot be loaded (a vmx naming a disk that
// is about to be created, say), what the vmx alone says, so a broken
// disk reference never turns new files of an encrypted VM into plain
// ones. nil: dir holds no vmx. An unreadable vmx is an error: fail
// closed.
func (d *Datastore) placementLayout(dir string) (*vm.Layout, error) {
	l, err := d.Layout(dir)
	if err == nil {
		return l, nil
	}
	vmxPath, ferr := vmdir.FindVMX(dir)
	if errors.Is(ferr, vmdir.ErrNoVMX) {
		return nil, nil // not a VM directory
	}
	if ferr != nil {
		return nil, ferr // several .vmx files, say: fail closed
	}
	text, err := safeopen.ReadFile(vmxPath, vm.MaxVMXText)
	if err != nil {
		return nil, err
	}
	cfg, err := vmx.Parse(text)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", vmxPath, err)
	}
	m := &vm.Layout{Dir: filepath.Clean(dir), VMXPath: vmxPath, VMXText: text, VMX: cfg}
	m.KeySafe, _ = cfg.Get(vm.VMXKeySafe)
	m.Encrypted = m.KeySafe != ""
	m.VMID, _ = cfg.Get(vm.VMXVMID)
	return m, nil
}

// dekKey includes the fingerprint so a deep rekey (same owner, new DEK)
// never serves a stale key.
type dekKey struct {
	dir     string
	binding keys.Binding
	fp      [16]byte
}

// FileState is how a view must serve a file.
type FileState int

const (
	FilePlain FileState = iota
	FileEncrypted
	FileLocked
)

// NewDatastore returns a resolver for root.
func NewDatastore(root string, kr *keys.Keyring, opts DatastoreOptions) *Datastore {
	made := opts.Made
	if made == nil {
		made = NewMadeFiles()
	}
	return &Datastore{root: filepath.Clean(root), Keys: kr, impl: opts.Impl, keyErr: opts.KeyErr, busyFn: opts.Busy,
		corePatterns: append([]string(nil), opts.CoreDumpPatterns...), made: made,
		deks: map[dekKey]*keys.DEK{}, layouts: map[string]cachedLayout{}, pending: map[string]pendingDisk{}, kept: map[string][16]byte{}}
}

// Root is the datastore directory the resolver serves.
func (d *Datastore) Root() string { return d.root }

func (d *Datastore) abs(rel string) (string, error) {
	p := filepath.Join(d.root, filepath.FromSlash(rel))
	if p != d.root && !strings.HasPrefix(p, d.root+string(filepath.Separator)) {
		return "", fmt.Errorf("%s: outside the datastore", rel)
	}
	return p, nil
}

// Classify says whether rel is plain, an encrypted container whose key is
// available, or one whose key is not or that is refused (with the reason).
func (d *Datastore) Classify(rel string) (FileState, string, error) {
	c, err := d.classify(rel)
	var ref *vm.RefusedError
	switch {
	case err != nil:
		return 0, "", err
	case errors.As(c.why, &ref):
		return c.state, fmt.Sprintf("refused (%s): %s", ref.Clause, ref.Why), nil
	case c.why != nil:
		return c.state, c.why.Error(), nil
	}
	return c.state, "", nil
}

// classification is a file's FileState and, for FileLocked, why: a
// *RefusedError (the trust decision refuses the file) or the key error.
type classification struct {
	state FileState
	why   error
}

// classify is Classify with the reason as an error.
func (d *Datastore) classify(rel string) (classification, error) {
	path, err := d.abs(rel)
	if err != nil {
		return classification{}, err
	}
	head, err := container.ReadHead(path)
	if err != nil {
		return classification{}, err
	}
	r := d.roleOf(path, head)
	switch r.Verdict {
	case vm.VerdictPlain:
		return classification{state: FilePlain}, nil
	case vm.VerdictSuspect:
		return classification{FileLocked, r.Refusal(path)}, nil
	}
	if _, err := d.dekFor(path, head, r); err != nil {
		return classification{FileLocked, err}, nil
	}
	return classification{state: FileEncrypted}, nil
}

// ErrBusy is returned for files of a VM under conversion.
var ErrBusy = errors.New("VM directory is being converted; try again when the operation ends")

func (d *Datastore) busy(path string) error {
	if d.busyFn != nil && d.busyFn(path) {
		return fmt.Errorf("%s: %w", path, ErrBusy)
	}
	return nil
}

// ErrKeyLines refuses cutting a descriptor that holds a disk's key lines.
var ErrKeyLines = errors.New("holds a disk's key lines: replace it by rename (an editor's save, sed -i), or delete the disk first; truncating it in place would lose the disk's key")

// MayTruncate refuses (ErrKeyLines) truncating a VMDK descriptor that
// holds encryptionKeys: qemu-img create over an encrypted disk, or a
// shell redirection, would rewrite it without the key lines (the
// extents' header copies keep the key, but nothing trusts them without
// restore-keys). Writers that save by rename are not affected.
func (d *Datastore) MayTruncate(rel string) error {
	path, err := d.abs(rel)
	if err != nil {
		return err
	}
	if err := d.busy(path); err != nil {
		return err
	}
	if !vm.IsVMDKName(path) {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size > vm.MaxDescriptor {
		return nil
	}
	raw, err := safeopen.ReadFile(path, vm.MaxDescriptor)
	if err != nil {
		return nil
	}
	if desc, err := vmdk.ParseDescriptor(raw); err == nil {
		if ks, _ := desc.Get(vm.DescKeySafe); ks != "" {
			return fmt.Errorf("%s: %w", path, ErrKeyLines)
		}
	}
	return nil
}

// MayOpen refuses (ErrBusy) opening a file of a VM being converted.
func (d *Datastore) MayOpen(rel string) error {
	path, err := d.abs(rel)
	if err != nil {
		return err
	}
	return d.busy(path)
}

// Open opens the container at rel with its DEK.
func (d *Datastore) Open(rel string, readOnly bool) (*container.Container, error) {
	path, err := d.abs(rel)
	if err != nil {
		return nil, err
	}
	if err := d.busy(path); err != nil {
		return nil, err
	}
	// One descriptor for the decision and for what is served: the header
	// read, the link count and inode the trust decision uses, and the
	// container opened all come from f.
	f, err := safeopen.Open(path, container.OpenFlag(readOnly))
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	owned := true
	defer func() {
		if owned {
			f.Close()
		}
	}()
	head, err := container.ReadHeadFrom(f)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if _, err := container.PeekHeader(head); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	r := d.roleOfFile(path, head, &st)
	switch r.Verdict {
	case vm.VerdictPlain:
		return nil, fmt.Errorf("%s: %w", path, ErrPlainByLayout)
	case vm.VerdictSuspect:
		return nil, r.Refusal(path)
	}
	dek, err := d.dekFor(path, head, r)
	if err != nil {
		return nil, err
	}
	if !readOnly {
		if err := d.writableFile(r, head); err != nil { // revoked KEK: read-only
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	// A reader may have a degraded container (one header slot damaged,
	// FORMAT.md 3.1) as its surviving slot records it; a writer may not.
	owned = false
	c, err := container.OpenContainerFile(f, path, dek, readOnly, d.impl)
	if err != nil {
		return nil, err
	}
	// The authenticated kind must fit the name (dekFor checked the
	// unauthenticated slots already, so Classify agrees).
	if err := vm.KindFits(path, r, c.Header().Kind); err != nil {
		c.Close()
		return nil, err
	}
	want := r.Kind
	// A view opens containers writable whenever it is mounted writable,
	// whoever reads: so this runs at the first open of a .vmdk container
	// through a writable view, and the close of any of its handles
	// settles.
	if !readOnly && want == container.KindExtent {
		desc, _ := vm.DescriptorName(filepath.Base(path))
		d.recoverPending(filepath.Join(filepath.Dir(path), desc))
	}
	return c, nil
}

// ErrPlainByLayout is returned by Open for a file that looks like a
// container where its VM says the file is plain (see roleOf).
var ErrPlainByLayout = errors.New("looks like a container, but its VM's files say it is plain")

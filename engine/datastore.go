package engine

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/xts"
	"github.com/vmcryptd/vmcryptd/formats/vmdir"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
)

// Datastore resolves the files of a datastore directory for a decrypted
// view: which are containers, which DEK opens each, and whether that key
// can be had now. DEKs are unwrapped on first use and cached, in locked
// memory, until Close.
type Datastore struct {
	Root string
	Keys *Keyring
	Impl xts.Impl
	// KeyErr, if set, explains why a KEK is not in memory (the daemon's
	// last fetch error). The view never fetches keys itself: a file
	// lookup must not wait on a key server; the daemon's loader does.
	KeyErr func(KeyRef) string
	// Busy, if set, reports whether path is, is inside, or holds a VM
	// directory in the middle of an operation that replaces its files
	// (encrypt, decrypt, deep rekey): opening, creating, renaming or
	// unlinking there is refused, so nothing is written to a file about
	// to be replaced or created in plain text beside its encrypted
	// siblings, and the directory is not moved from under the operation.
	Busy func(path string) bool
	// CoreDumpPatterns are extra file-name patterns of core dumps.
	CoreDumpPatterns []string

	mu      sync.Mutex
	deks    map[dekKey]*DEK
	layouts map[string]cachedLayout
	// pending holds the disks created through the view whose descriptor
	// is not settled yet, by descriptor path (see viewdisk.go).
	pending map[string]pendingDisk
	// kept remembers, by descriptor path, the container (file id) a
	// settle left encrypted, so opening it again does not make it
	// pending again (recoverPending) and re-run the same refusal.
	kept map[string][16]byte
}

// cachedLayout is a VM directory's layout as of the directory's and the
// vmx's modification times. vmcryptd rewrites text files by rename, which
// changes the directory's mtime, so a view does not re-read the vmx and
// every descriptor on each lookup of an encrypted file.
type cachedLayout struct {
	dirMod, vmxMod time.Time
	l              *vmLayout
	err            error
}

// layout returns dir's layout, from the cache while dir and its vmx are
// unchanged.
func (d *Datastore) layout(dir string) (*vmLayout, error) {
	dst, err := os.Stat(dir)
	if err != nil {
		return nil, err
	}
	var vmxMod time.Time
	if p, err := vmdir.FindVMX(dir); err == nil {
		if st, err := os.Stat(p); err == nil {
			vmxMod = st.ModTime()
		}
	}
	d.mu.Lock()
	c, ok := d.layouts[dir]
	d.mu.Unlock()
	if ok && c.dirMod.Equal(dst.ModTime()) && c.vmxMod.Equal(vmxMod) {
		return c.l, c.err
	}
	l, err := loadLayout(dir, d.CoreDumpPatterns)
	d.mu.Lock()
	d.layouts[dir] = cachedLayout{dirMod: dst.ModTime(), vmxMod: vmxMod, l: l, err: err}
	d.mu.Unlock()
	return l, err
}

// placementLayout is the layout that decides where new files go: dir's
// full layout, or, when that cannot be loaded (a vmx naming a disk that
// is about to be created, say), what the vmx alone says, so a broken
// disk reference never turns new files of an encrypted VM into plain
// ones. nil: dir holds no vmx. An unreadable vmx is an error: fail
// closed.
func (d *Datastore) placementLayout(dir string) (*vmLayout, error) {
	l, err := d.layout(dir)
	if err == nil {
		return l, nil
	}
	vmxPath, ferr := vmdir.FindVMX(dir)
	if ferr != nil {
		return nil, nil // not a VM directory
	}
	text, err := os.ReadFile(vmxPath)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", vmxPath, err)
	}
	cfg, err := vmx.Parse(text)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", vmxPath, err)
	}
	m := &vmLayout{Dir: filepath.Clean(dir), VMXPath: vmxPath, VMXText: text, VMX: cfg}
	m.KeySafe, _ = cfg.Get(VMXKeySafe)
	m.Encrypted = m.KeySafe != ""
	m.VMID, _ = cfg.Get(VMXVMID)
	return m, nil
}

// dekKey includes the fingerprint so a deep rekey (same owner, new DEK)
// never serves a stale key.
type dekKey struct {
	dir     string
	binding Binding
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
func NewDatastore(root string, keys *Keyring, impl xts.Impl) *Datastore {
	return &Datastore{Root: filepath.Clean(root), Keys: keys, Impl: impl, deks: map[dekKey]*DEK{}, layouts: map[string]cachedLayout{}, pending: map[string]pendingDisk{}, kept: map[string][16]byte{}}
}

func (d *Datastore) abs(rel string) (string, error) {
	p := filepath.Join(d.Root, filepath.FromSlash(rel))
	if p != d.Root && !strings.HasPrefix(p, d.Root+string(filepath.Separator)) {
		return "", fmt.Errorf("%s: outside the datastore", rel)
	}
	return p, nil
}

func readHead(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	head := make([]byte, HeaderSize)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return head[:n], nil
}

// Classify says whether rel is plain, an encrypted container whose key is
// available, or one whose key is not (with the reason).
func (d *Datastore) Classify(rel string) (FileState, string, error) {
	path, err := d.abs(rel)
	if err != nil {
		return 0, "", err
	}
	head, err := readHead(path)
	if err != nil {
		return 0, "", err
	}
	if _, err := PeekHeader(head); err != nil {
		return FilePlain, "", nil
	}
	switch v, why := d.layoutVerdict(path, head); v {
	case verdictPlain:
		return FilePlain, "", nil
	case verdictSuspect:
		return FileLocked, why, nil
	}
	if _, err := d.dekFor(path, head); err != nil {
		return FileLocked, err.Error(), nil
	}
	return FileEncrypted, "", nil
}

// ErrKeyUnavailable means the KEK that wraps a file's DEK is not in
// memory (not fetched yet, or its key server refused it).
var ErrKeyUnavailable = errors.New("not available")

// ErrBusy is returned for files of a VM under conversion.
var ErrBusy = errors.New("VM directory is being converted; try again when the operation ends")

func (d *Datastore) busy(path string) error {
	if d.Busy != nil && d.Busy(path) {
		return fmt.Errorf("%s: %w", path, ErrBusy)
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

// verdict is what a VM's text files say about a file that starts like a
// container.
type verdict int

const (
	verdictContainer verdict = iota // serve it decrypted
	verdictPlain                    // its bytes are data, whatever they look like
	verdictSuspect                  // neither: refuse it (see layoutVerdict)
)

// layoutVerdict decides, from the VM directory holding path, how a file
// whose first bytes (head) parse as a container header is served. A
// header proves nothing by itself, and neither does a keySafe copy in
// it: a guest can write anything at the start of its own plain disk,
// including another disk's whole container (ciphertext from a backup),
// whose copy the host's KEKs would open. So:
//
//   - an extent of a disk whose descriptor has encryptionKeys is a
//     container;
//   - an extent of a disk whose descriptor has none is plain, unless all
//     its extents are containers of one disk with the same keySafe copy:
//     that is a descriptor that lost its key lines (or a conversion
//     stopped before writing them), or a guest that wrote such bytes, and
//     serving it either way could leak another VM's data or overwrite
//     the only copy of this one's, so it is refused until an
//     administrator restores the lines (RestoreDiskKeys) or the
//     conversion is finished;
//   - in a plain VM, every other file is plain too, except a core dump
//     (its key is wrapped by the host key and carried in its header);
//   - in an encrypted VM, other files are containers if they look like
//     one (VM files under the VM key, and .vmdk files made through a view
//     before any descriptor names them, with their keySafe copy);
//   - outside VM directories the header decides.
func (d *Datastore) layoutVerdict(path string, head []byte) (verdict, string) {
	l, err := d.layout(filepath.Dir(path))
	if err != nil {
		return verdictContainer, "" // not a VM directory: trust the header
	}
	name := filepath.Base(path)
	for _, dk := range l.Disks {
		for _, e := range dk.Extents {
			if e != name {
				continue
			}
			if dk.KeySafe != "" {
				return verdictContainer, ""
			}
			if b, _, ok := extentCopies(l.Dir, dk); ok {
				return verdictSuspect, fmt.Sprintf("disk %s has no encryptionKeys line, but its extents are containers of disk %s (see vmcryptd vm status)", dk.Name, b.OwnerID)
			}
			return verdictPlain, ""
		}
	}
	if l.Encrypted {
		return verdictContainer, ""
	}
	if h, err := PeekHeader(head); err == nil && h.Kind == KindCoreDump {
		return verdictContainer, ""
	}
	return verdictPlain, ""
}

// Open opens the container at rel with its DEK.
func (d *Datastore) Open(rel string, readOnly bool) (*Container, error) {
	path, err := d.abs(rel)
	if err != nil {
		return nil, err
	}
	if err := d.busy(path); err != nil {
		return nil, err
	}
	head, err := readHead(path)
	if err != nil {
		return nil, err
	}
	if _, err := PeekHeader(head); err == nil {
		switch v, why := d.layoutVerdict(path, head); v {
		case verdictPlain:
			return nil, fmt.Errorf("%s: %w", path, ErrPlainByLayout)
		case verdictSuspect:
			return nil, fmt.Errorf("%s: %w: %s", path, ErrKeyUnavailable, why)
		}
	}
	dek, err := d.dekFor(path, head)
	if err != nil {
		return nil, err
	}
	c, err := OpenContainer(path, dek, readOnly, d.Impl)
	if err != nil {
		return nil, err
	}
	// The authenticated kind must fit the name: files of one VM share a
	// key, so without this check a swap file renamed over the nvram (by
	// anyone who can write the datastore) would be served as the nvram.
	want := vmKindByName(path)
	if want == 0 && isVMDKName(path) {
		want = KindExtent
	}
	if got := c.Header().Kind; want != 0 && got != want {
		c.Close()
		return nil, fmt.Errorf("%s: %w: holds a %s container, its name says %s", path, ErrKindMismatch, got, want)
	}
	// A view opens containers writable whenever it is mounted writable,
	// whoever reads: so this runs at the first open of a .vmdk container
	// through a writable view, and the close of any of its handles
	// settles.
	if !readOnly && want == KindExtent {
		desc, _ := descriptorName(filepath.Base(path))
		d.recoverPending(filepath.Join(filepath.Dir(path), desc))
	}
	return c, nil
}

// ErrPlainByLayout is returned by Open for a file that looks like a
// container where its VM says the file is plain (see layoutVerdict).
var ErrPlainByLayout = errors.New("looks like a container, but its VM's files say it is plain")

// ErrKindMismatch is returned for a container whose authenticated kind
// does not fit its file name.
var ErrKindMismatch = errors.New("container kind does not match the file name")

// vmKindByName picks the container kind of a VM-key file by its name; ""
// means the file is not one the VM key protects.
func vmKindByName(name string) Kind {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".nvram":
		return KindNVRAM
	case ".vswp":
		return KindVSWP
	case ".vmsn":
		return KindVMSN
	case ".vmss":
		return KindVMSS
	case ".vmem":
		return KindVMEM
	}
	return 0
}

// Create makes a new file for the view: inside an encrypted VM's
// directory, the VM-key kinds (nvram, swap, snapshot and suspend state,
// memory) are created as containers under the VM DEK, and .vmdk files as
// containers of a disk (a new one, or the encrypted disk whose extent the
// name says it is; see viewdisk.go). Everything else is plain, and so is
// every file outside encrypted VMs.
func (d *Datastore) Create(rel string, perm os.FileMode) (*Container, bool, error) {
	path, err := d.abs(rel)
	if err != nil {
		return nil, false, err
	}
	if err := d.busy(path); err != nil {
		return nil, false, err
	}
	kind := vmKindByName(path)
	if kind == 0 && !isVMDKName(path) {
		return nil, false, nil
	}
	l, err := d.placementLayout(filepath.Dir(path))
	if err != nil {
		return nil, false, err
	}
	if l == nil || !l.Encrypted {
		return nil, false, nil // not a VM directory, or a plain VM
	}
	if kind == 0 {
		return d.createDiskFile(l, path, perm)
	}
	b := Binding{PurposeVM, l.VMID}
	dek, err := d.cachedDEK(l.Dir, b, l.KeySafe)
	if err != nil {
		return nil, false, err
	}
	c, err := CreateContainer(path, dek, CreateOptions{Kind: kind, Binding: b, Impl: d.Impl, Perm: perm})
	if err != nil {
		return nil, false, err
	}
	return c, true, nil
}

// WouldEncrypt reports whether Create(rel) would make a container.
func (d *Datastore) WouldEncrypt(rel string) (bool, error) {
	path, err := d.abs(rel)
	if err != nil {
		return false, err
	}
	if vmKindByName(path) == 0 && !isVMDKName(path) {
		return false, nil
	}
	l, err := d.placementLayout(filepath.Dir(path))
	if err != nil {
		return false, err
	}
	if l == nil || !l.Encrypted {
		return false, nil
	}
	if isVMDKName(path) {
		// Replacing an existing file keeps its form (so `sed -i` on a
		// plain descriptor works through the view).
		if st, err := os.Lstat(path); err == nil && st.Mode().IsRegular() {
			fs, _, err := d.Classify(rel)
			return err == nil && fs != FilePlain, nil
		}
		desc, _ := descriptorName(filepath.Base(path))
		for _, dk := range l.Disks {
			if dk.Name == desc && !dk.Embedded && dk.KeySafe == "" {
				return false, nil // an extent of a plain disk
			}
		}
	}
	return true, nil
}

// dekFor finds the keySafe that holds the DEK of the container at path
// (from its header's binding) and unwraps it.
func (d *Datastore) dekFor(path string, head []byte) (*DEK, error) {
	h, err := PeekHeader(head)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	d.mu.Lock()
	dek, ok := d.deks[dekKey{dir, h.Binding, h.Fingerprint}]
	d.mu.Unlock()
	if ok {
		return dek, nil
	}
	var ks string
	if eks, ok := ReadEmbeddedKeySafe(head); ok {
		ks = eks
	} else {
		l, err := d.layout(dir)
		if err != nil {
			return nil, fmt.Errorf("%s: no VM to take its key from: %w", path, err)
		}
		switch h.Binding.Purpose {
		case PurposeVM:
			if l.VMID == h.Binding.OwnerID {
				ks = l.KeySafe
			}
		case PurposeDisk:
			for _, dk := range l.Disks {
				if dk.DiskID == h.Binding.OwnerID {
					ks = dk.KeySafe
				}
			}
		}
		if ks == "" {
			return nil, fmt.Errorf("%s: no keySafe in %s for %s %s", path, dir, h.Binding.Purpose, h.Binding.OwnerID)
		}
	}
	dek, err = d.cachedDEK(dir, h.Binding, ks)
	if err != nil {
		return nil, err
	}
	if fp, err := DEKFingerprint(dek); err != nil || fp != h.Fingerprint {
		return nil, fmt.Errorf("%s: %w (its keySafe holds another DEK)", path, ErrWrongKey)
	}
	return dek, nil
}

// cachedDEK unwraps the DEK of ks and caches it (by fingerprint).
func (d *Datastore) cachedDEK(dir string, b Binding, ks string) (*DEK, error) {
	entries, err := DecodeKeySafe(ks)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, e := range entries {
		kek, ok := d.Keys.Peek(e.KEK)
		if !ok {
			why := "not loaded"
			if d.KeyErr != nil {
				if s := d.KeyErr(e.KEK); s != "" {
					why = s
				}
			}
			errs = append(errs, fmt.Errorf("key %s %w: %s", e.KEK, ErrKeyUnavailable, why))
			continue
		}
		dek, err := UnwrapDEK(kek, e.Locked, b)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fp, err := DEKFingerprint(dek)
		if err != nil {
			dek.Destroy()
			return nil, err
		}
		k := dekKey{dir, b, fp}
		d.mu.Lock()
		if old, ok := d.deks[k]; ok { // already cached: keep one copy
			d.mu.Unlock()
			dek.Destroy()
			return old, nil
		}
		d.deks[k] = dek
		d.mu.Unlock()
		return dek, nil
	}
	return nil, errors.Join(errs...)
}

// Forget drops the cached DEKs and layout of one VM directory (after a
// rekey or a decrypt changed them), or of all when dir is "".
func (d *Datastore) Forget(dir string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k := range d.layouts {
		if dir == "" || k == filepath.Clean(dir) {
			delete(d.layouts, k)
		}
	}
	for k := range d.pending {
		if dir == "" || filepath.Dir(k) == filepath.Clean(dir) {
			delete(d.pending, k)
		}
	}
	for k := range d.kept {
		if dir == "" || filepath.Dir(k) == filepath.Clean(dir) {
			delete(d.kept, k)
		}
	}
	for k, dek := range d.deks {
		if dir == "" || k.dir == filepath.Clean(dir) {
			dek.Destroy()
			delete(d.deks, k)
		}
	}
}

// Close zeroes every cached DEK.
func (d *Datastore) Close() { d.Forget("") }

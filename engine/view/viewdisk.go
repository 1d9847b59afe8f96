package view

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// New disks made through a view.
//
// A tool such as `qemu-img create -f vmdk` makes a disk in one of two
// shapes, and the view cannot tell which when the first file is created:
//
//   - one file holding its own descriptor (monolithicSparse,
//     streamOptimized): it must be encrypted from its first byte, and its
//     key lives in its header (FORMAT.md 3.4), like such a disk after
//     `vmcryptd vm encrypt`;
//   - a text descriptor plus extent files (-flat, -sNNN, -fNNN): the
//     extents are encrypted, and the descriptor must end up as plain text
//     with encryptionKeys and ddb.vmcryptd.diskId (FORMAT.md 4.3), which
//     only exist once the tool has written it.
//
// So every .vmdk file created in an encrypted VM's directory starts as a
// container of a fresh disk (its own disk id and DEK, wrapped under the
// VM's KEK) that carries its keySafe in its header. Extent files named
// after the same descriptor join that disk. When the view has written and
// closed the descriptor file (Settle), a descriptor that turned out to be
// text is replaced by its plain form with the key lines, once every extent
// it names is a container of its disk. The extents keep their header
// copy of the keySafe, so each file stays readable on its own even before
// a vmx names the disk; RekeyShallow rewraps those copies too.

// pendingDisk is a disk created through the view whose descriptor has not
// been settled yet. It holds the wrapped key only.
type pendingDisk struct {
	diskID  string
	keySafe string
	// recovered: found again by recoverPending, not made by this view.
	// Its text may have been written by a guest (a raw disk the vmx
	// names), so its own key lines are never adopted.
	recovered bool
}

// createDiskFile makes path, a .vmdk file inside the encrypted VM of l, as
// a container of its disk (an existing encrypted disk of the VM, the
// pending disk of its descriptor, or a new one). ok=false means the file
// belongs to a plain disk of the VM and is to be created plain.
func (d *Datastore) createDiskFile(l *vm.Layout, path string, perm os.FileMode) (*container.Container, bool, error) {
	desc, _ := vm.DescriptorName(filepath.Base(path))
	var b keys.Binding
	var ks string
	for _, dk := range l.Disks {
		if dk.Name != desc || dk.Embedded {
			continue
		}
		if dk.KeySafe == "" {
			return nil, false, nil // an extent of a plain disk stays plain
		}
		b, ks = keys.Binding{Purpose: keys.PurposeDisk, OwnerID: dk.DiskID}, dk.KeySafe
	}
	if ks == "" && desc != filepath.Base(path) {
		// An extent of a disk the vmx does not name (yet): join the disk
		// its descriptor file says, not a new one.
		var plain bool
		var err error
		b, ks, plain, err = diskOfDescriptorFile(filepath.Join(l.Dir, desc))
		if err != nil {
			return nil, false, err
		}
		if plain {
			return nil, false, nil
		}
	}
	if ks == "" {
		p, err := d.pendingFor(l, filepath.Join(l.Dir, desc))
		if err != nil {
			return nil, false, err
		}
		b, ks = keys.Binding{Purpose: keys.PurposeDisk, OwnerID: p.diskID}, p.keySafe
	}
	dek, err := d.cachedDEK(l.Dir, b, ks)
	if err != nil {
		return nil, false, err
	}
	c, err := container.CreateContainer(path, dek, container.CreateOptions{Kind: container.KindExtent, Binding: b, Impl: d.impl, Perm: perm, EmbeddedKeySafe: ks})
	if err != nil {
		return nil, false, err
	}
	if key, err := madeKeyOf(path, c.Header().FileID); err == nil {
		d.made.add(key)
	}
	return c, true, nil
}

// diskOfDescriptorFile reads the descriptor file at p, if it exists: a
// plain descriptor with key lines gives its disk, one without them
// (plain=true) a plain disk; a container (a descriptor not settled
// before a restart) gives the disk in its header. Nothing found: "".
func diskOfDescriptorFile(p string) (b keys.Binding, ks string, plain bool, err error) {
	st, err := os.Lstat(p)
	if errors.Is(err, os.ErrNotExist) {
		return b, "", false, nil
	}
	if err != nil {
		return b, "", false, err
	}
	if !st.Mode().IsRegular() {
		return b, "", false, fmt.Errorf("%s: not a regular file", p)
	}
	head, err := container.ReadHead(p)
	if err != nil {
		return b, "", false, err
	}
	if h, err := container.PeekHeader(head); err == nil {
		if eks, ok := container.ReadEmbeddedKeySafe(head); ok && h.Binding.Purpose == keys.PurposeDisk {
			return h.Binding, eks, false, nil
		}
		return b, "", false, nil
	}
	if st.Size() > vm.MaxDescriptor {
		return b, "", false, nil
	}
	raw, err := safeopen.ReadFile(p, vm.MaxDescriptor)
	if err != nil {
		return b, "", false, err
	}
	desc, err := vmdk.ParseDescriptor(raw)
	if err != nil || !vmdk.IsDescriptorText(raw) {
		return b, "", false, nil // not a descriptor: a disk of its own
	}
	ks, _ = desc.Get(vm.DescKeySafe)
	id, _ := desc.Get(vm.DDBDiskID)
	if ks == "" || id == "" {
		return b, "", true, nil
	}
	return keys.Binding{Purpose: keys.PurposeDisk, OwnerID: id}, ks, false, nil
}

// pendingFor returns the pending disk of the descriptor at descPath,
// making one (new disk id and DEK, wrapped under a KEK of the VM that is in
// memory) if there is none.
func (d *Datastore) pendingFor(l *vm.Layout, descPath string) (pendingDisk, error) {
	d.mu.Lock()
	p, ok := d.pending[descPath]
	d.mu.Unlock()
	if ok {
		return p, nil
	}
	entries, err := keys.DecodeKeySafe(l.KeySafe)
	if err != nil {
		return pendingDisk{}, fmt.Errorf("%s: VM keySafe: %w", l.VMXPath, err)
	}
	var kekRef keys.KeyRef
	var kek *keys.KEK
	for _, e := range entries {
		if k, ok := d.Keys.Peek(e.KEK); ok {
			kekRef, kek = e.KEK, k
			break
		}
	}
	if kek == nil {
		return pendingDisk{}, fmt.Errorf("new disk %s: VM key %w", descPath, keys.ErrKeyUnavailable)
	}
	id, err := vm.NewID()
	if err != nil {
		return pendingDisk{}, err
	}
	dek, err := keys.NewDEK()
	if err != nil {
		return pendingDisk{}, err
	}
	defer dek.Destroy()
	b := keys.Binding{Purpose: keys.PurposeDisk, OwnerID: id}
	locked, err := keys.WrapDEK(kek, dek, b)
	if err != nil {
		return pendingDisk{}, err
	}
	ks, err := keys.EncodeKeySafe([]keys.KeySafeEntry{{KEK: kekRef, Locked: locked}})
	if err != nil {
		return pendingDisk{}, err
	}
	p = pendingDisk{diskID: id, keySafe: ks}
	d.mu.Lock()
	if old, ok := d.pending[descPath]; ok { // lost a race: use the first
		p = old
	} else {
		d.pending[descPath] = p
	}
	d.mu.Unlock()
	return p, nil
}

// madeKey identifies a container this view created: its inode (which a
// rename keeps) and its header's random file id (which a copy of its
// Bytes into another file keeps, but not the inode).
type madeKey struct {
	dev, ino uint64
	fileID   [16]byte
}

func madeKeyOf(path string, fileID [16]byte) (madeKey, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return madeKey{}, err
	}
	return madeKey{uint64(st.Dev), st.Ino, fileID}, nil
}

// describedBy finds the text descriptor in dir that names name as one of
// its extents (a disk no vmx names: detached, or made through a view and
// settled). Only files no guest writes are candidates: not an extent of
// any disk of the layout, not a file named like an extent, and starting
// with the descriptor magic. found=false: none names it; err: more than
// one does (ambiguous, refused).
func describedBy(l *vm.Layout, name string) (dk *vm.Disk, found bool, err error) {
	guestWritable := map[string]bool{}
	for _, x := range l.Disks {
		for _, e := range x.Extents {
			guestWritable[e] = true
		}
	}
	ents, err := os.ReadDir(l.Dir)
	if err != nil {
		return nil, false, err
	}
	for _, e := range ents {
		n := e.Name()
		if n == name || !vm.IsVMDKName(n) || !e.Type().IsRegular() || guestWritable[n] {
			continue
		}
		if _, isExtent := vm.DescriptorName(n); isExtent {
			continue
		}
		if info, err := e.Info(); err != nil || info.Size() > vm.MaxDescriptor {
			continue
		}
		if head, err := container.ReadHead(filepath.Join(l.Dir, n)); err != nil || !vmdk.IsDescriptorText(head) {
			continue
		}
		cand, _, err := vm.LoadDisk(l.Dir, n)
		if err != nil || cand.Embedded {
			continue
		}
		for _, x := range cand.Extents {
			if x != name {
				continue
			}
			if dk != nil {
				return nil, false, fmt.Errorf("named by two descriptors, %s and %s", dk.Name, cand.Name)
			}
			dk = cand
		}
	}
	return dk, dk != nil, nil
}

// recoverPending finds a disk made through a view whose descriptor was
// not settled before the pending state was lost (a daemon restart, or
// Forget after a VM operation): the descriptor file is still a container
// of its own disk holding text. It is made pending again, so the next
// close of a file of that disk settles it. A descriptor a settle already
// left encrypted (kept) is not retried. Errors only mean "not such a
// disk". It may race with a Settle of the same descriptor and re-register
// the old container just replaced; the next settle then finds plain text
// and drops the entry (settleKept), so nothing is written.
func (d *Datastore) recoverPending(descPath string) {
	d.mu.Lock()
	_, ok := d.pending[descPath]
	d.mu.Unlock()
	if ok {
		return
	}
	head, err := vm.RegularHead(descPath)
	if err != nil {
		return
	}
	h, err := container.PeekHeader(head)
	if err != nil || h.Kind != container.KindExtent || h.Binding.Purpose != keys.PurposeDisk || h.Size > vm.MaxDescriptor {
		return
	}
	d.mu.Lock()
	kept, ok := d.kept[descPath]
	d.mu.Unlock()
	if ok && kept == h.FileID {
		return
	}
	ks, ok := container.ReadEmbeddedKeySafe(head)
	if !ok {
		return
	}
	dek, err := d.cachedDEK(filepath.Dir(descPath), h.Binding, ks)
	if err != nil {
		return
	}
	c, err := container.OpenContainer(descPath, dek, true, d.impl)
	if err != nil {
		return
	}
	magic := make([]byte, len(vmdk.DescriptorMagic))
	_, err = c.ReadAt(magic, 0)
	c.Close()
	if err != nil || !vmdk.IsDescriptorText(magic) {
		return // a sparse disk (its own descriptor inside), or not a disk
	}
	d.mu.Lock()
	if _, ok := d.pending[descPath]; !ok {
		d.pending[descPath] = pendingDisk{diskID: h.Binding.OwnerID, keySafe: ks, recovered: true}
	}
	d.mu.Unlock()
}

// Unsettled reports, without I/O, whether rel is a file of a disk made
// through the view whose descriptor is not settled yet.
func (d *Datastore) Unsettled(rel string) bool {
	p, err := d.abs(rel)
	if err != nil || !vm.IsVMDKName(p) {
		return false
	}
	desc, _ := vm.DescriptorName(filepath.Base(p))
	d.mu.Lock()
	_, ok := d.pending[filepath.Join(filepath.Dir(p), desc)]
	d.mu.Unlock()
	return ok
}

// Settle finishes a disk made through the view after a file of it was
// written and closed: rel is that file, and isOpen says whether another
// file of the view is open. When the disk's descriptor file holds a text
// descriptor, no one has it open, and every extent it names exists as a
// container of its disk, the descriptor is atomically replaced by its
// plain form with encryptionKeys and ddb.vmcryptd.diskId. It returns the
// files it replaced (slash paths relative to the datastore), which a view
// must stop serving from any cached state.
//
// A descriptor file that holds a sparse disk (its own descriptor inside)
// stays a container: it is already a complete encrypted disk. One that
// holds neither stays a container too; nothing is ever decrypted to disk
// that the creator did not write as a descriptor.
//
// unchanged, if not nil, is asked right before the replacement whether
// the file is still as read (no write since); false leaves it for the
// next close.
func (d *Datastore) Settle(rel string, isOpen func(rel string) bool, unchanged func() bool) ([]string, error) {
	p, err := d.abs(rel)
	if err != nil {
		return nil, err
	}
	if !vm.IsVMDKName(p) {
		return nil, nil
	}
	dir := filepath.Dir(p)
	desc, _ := vm.DescriptorName(filepath.Base(p))
	descPath := filepath.Join(dir, desc)
	d.mu.Lock()
	pd, ok := d.pending[descPath]
	d.mu.Unlock()
	if !ok {
		return nil, nil
	}
	descRel := path.Join(path.Dir(filepath.ToSlash(rel)), desc)
	if descRel != rel && isOpen(descRel) {
		return nil, nil // its own close settles it
	}
	if descRel != rel {
		unchanged = nil // the descriptor is not the file being closed
	}
	res, err := d.settleDescriptor(descPath, pd, unchanged)
	var keptID [16]byte
	isContainer := false
	if res == settleKept {
		if head, err := vm.RegularHead(descPath); err == nil {
			if h, err := container.PeekHeader(head); err == nil {
				keptID, isContainer = h.FileID, true
			}
		}
	}
	if res != settleLater {
		d.mu.Lock()
		delete(d.pending, descPath)
		delete(d.layouts, dir)
		if isContainer {
			d.kept[descPath] = keptID
		}
		d.mu.Unlock()
	}
	if res != settleReplaced {
		return nil, err
	}
	return []string{descRel}, err
}

// settleResult is what settleDescriptor did.
type settleResult int

const (
	settleLater    settleResult = iota // not complete yet: try at the next close
	settleKept                         // stays a container (sparse disk, not a disk, or refused)
	settleReplaced                     // rewritten as a plain descriptor with the key lines
)

// errNotYet means the disk is not complete yet; Settle tries again at the
// next close of one of its files.
var errNotYet = errors.New("not yet")

// settleDescriptor does Settle's work on one pending descriptor.
func (d *Datastore) settleDescriptor(descPath string, pd pendingDisk, unchanged func() bool) (settleResult, error) {
	b := keys.Binding{Purpose: keys.PurposeDisk, OwnerID: pd.diskID}
	head, err := container.ReadHead(descPath)
	if errors.Is(err, os.ErrNotExist) {
		return settleLater, nil // extents first, descriptor later
	}
	if err != nil {
		return settleLater, err
	}
	h, err := container.PeekHeader(head)
	if err != nil || h.Binding != b {
		return settleKept, nil // replaced by something else behind our back
	}
	dek, err := d.cachedDEK(filepath.Dir(descPath), b, pd.keySafe)
	if err != nil {
		return settleLater, err
	}
	c, err := container.OpenContainer(descPath, dek, true, d.impl)
	if err != nil {
		return settleLater, err
	}
	text, err := readDescriptorText(c)
	c.Close()
	switch {
	case errors.Is(err, errNotYet):
		return settleLater, nil
	case err != nil:
		return settleKept, nil // a sparse disk, or not a disk at all: stays encrypted
	}
	parsed, err := vmdk.ParseDescriptor(text)
	if err != nil {
		// Not the parser's message: it quotes the line, which is
		// plaintext of an encrypted file, and this goes to the log.
		return settleKept, fmt.Errorf("%s: left encrypted: not a valid descriptor", descPath)
	}
	dir := filepath.Dir(descPath)
	ks, id := pd.keySafe, pd.diskID
	err = d.checkExtents(dir, filepath.Base(descPath), parsed, b, ks)
	if errors.Is(err, errNotYet) {
		return settleLater, nil
	}
	if err != nil {
		// An editor that saves by writing a new file turns an existing
		// encrypted disk's descriptor into a new .vmdk: it keeps its own
		// key lines, if they open every extent it names.
		ownID, _ := parsed.Get(vm.DDBDiskID)
		ownKS, _ := parsed.Get(vm.DescKeySafe)
		if pd.recovered || ownID == "" || ownKS == "" || d.checkExtents(dir, filepath.Base(descPath), parsed, keys.Binding{Purpose: keys.PurposeDisk, OwnerID: ownID}, ownKS) != nil {
			return settleKept, fmt.Errorf("%s: left encrypted: %w", descPath, err)
		}
		ks, id = ownKS, ownID
	}
	// A descriptor copied from another encrypted disk names that disk's
	// key and id while its extents here belong to this one: the lines
	// are always (re)set to the disk the extents belong to.
	if err := vm.SetKeyLines(parsed, ks, id); err != nil {
		return settleKept, fmt.Errorf("%s: %w", descPath, err)
	}
	if unchanged != nil && !unchanged() {
		return settleLater, nil
	}
	if err := replaceKeepingOwner(descPath, parsed.Bytes()); err != nil {
		return settleLater, err
	}
	return settleReplaced, nil
}

// readDescriptorText returns the plaintext of a descriptor-candidate
// container: errNotYet while it is empty, another error if it is not a
// text descriptor (a sparse disk or anything else).
func readDescriptorText(c *container.Container) ([]byte, error) {
	size := c.Size()
	if size == 0 {
		return nil, errNotYet
	}
	if size > vm.MaxDescriptor {
		return nil, errors.New("too large for a descriptor")
	}
	text := make([]byte, size)
	if _, err := c.ReadAt(text, 0); err != nil && err != io.EOF {
		return nil, err
	}
	if !vmdk.IsDescriptorText(text) {
		return nil, errors.New("not a text descriptor")
	}
	return text, nil
}

// checkExtents requires every file extent of desc to be a regular file
// in dir and a container bound to b whose DEK is the one ks holds (so the
// descriptor about to be written names a key that opens its data).
// errNotYet: an extent does not exist yet.
func (d *Datastore) checkExtents(dir, self string, desc *vmdk.Descriptor, b keys.Binding, ks string) error {
	var fp *[16]byte
	n := 0
	for _, e := range desc.Extents() {
		if e.Filename == "" {
			continue
		}
		n++
		p, err := vmdk.ResolveExtentPath(dir, e.Filename)
		if err != nil {
			return fmt.Errorf("extent %q: %w", e.Filename, err)
		}
		if filepath.Dir(p) != filepath.Clean(dir) {
			return fmt.Errorf("extent %q: not in the VM's directory", e.Filename)
		}
		if filepath.Base(p) == self {
			return fmt.Errorf("extent %q is the descriptor itself", e.Filename)
		}
		head, err := vm.RegularHead(p)
		if errors.Is(err, os.ErrNotExist) {
			return errNotYet
		}
		if err != nil {
			return fmt.Errorf("extent %q: %w", e.Filename, err)
		}
		h, err := container.PeekHeader(head)
		if err != nil || h.Binding != b || h.Kind != container.KindExtent {
			return fmt.Errorf("extent %q is not a container of disk %s", e.Filename, b.OwnerID)
		}
		if fp == nil {
			dek, err := d.cachedDEK(dir, b, ks)
			if err != nil {
				return err
			}
			f, err := container.DEKFingerprint(dek)
			if err != nil {
				return err
			}
			fp = &f
		}
		if h.Fingerprint != *fp {
			return fmt.Errorf("extent %q: %w", e.Filename, container.ErrWrongKey)
		}
	}
	if n == 0 {
		return errors.New("it names no extent file")
	}
	return nil
}

// replaceKeepingOwner atomically replaces the regular file at path with
// data, keeping its permissions and owner (set before the rename).
func replaceKeepingOwner(path string, data []byte) error {
	st, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s: not a regular file", path)
	}
	uid, gid := -1, -1
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		uid, gid = int(sys.Uid), int(sys.Gid)
	}
	return atomicfile.WriteAs(path, data, st.Mode().Perm(), uid, gid)
}

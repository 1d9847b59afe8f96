package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/engine/xts"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
)

// VMOps runs the VM lifecycle operations. Each operation that converts
// data (encrypt, decrypt, deep rekey) writes a journal first and can be
// re-run after a crash: files already converted are recognised by their
// header and skipped, the rest are converted, and text files are
// rewritten last.
type VMOps struct {
	Keys     *Keyring
	Impl     xts.Impl
	Log      *slog.Logger
	Progress func(ProgressEvent) // may be nil
	// HostKEK is the host encryption mode key; core dumps are encrypted
	// under it. Nil when the mode is off.
	HostKEK *KeyRef
	// CoreDumpPatterns are extra file-name patterns of core dumps.
	CoreDumpPatterns []string
}

// ProgressEvent reports conversion progress.
type ProgressEvent struct {
	Op    string `json:"op"`
	File  string `json:"file"`
	Done  int64  `json:"done"`  // bytes of all files so far
	Total int64  `json:"total"` // bytes of all files to convert
}

// ErrConversionInterrupted marks a VM whose journal shows a conversion
// that did not finish.
var ErrConversionInterrupted = errors.New("conversion interrupted")

// InterruptedOp returns the operation of an unfinished conversion in dir
// ("" if none).
func InterruptedOp(dir string) (string, error) {
	j, err := loadJournal(dir)
	if err != nil || j == nil {
		return "", err
	}
	return j.Op, nil
}

// unwrapFrom unwraps the DEK of a keySafe, trying each pair's KEK.
func (o *VMOps) unwrapFrom(ctx context.Context, ks string, b Binding) (*DEK, KeyRef, error) {
	entries, err := DecodeKeySafe(ks)
	if err != nil {
		return nil, KeyRef{}, err
	}
	var errs []error
	for _, e := range entries {
		kek, err := o.Keys.Get(ctx, e.KEK)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		dek, err := UnwrapDEK(kek, e.Locked, b)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		return dek, e.KEK, nil
	}
	return nil, KeyRef{}, errors.Join(errs...)
}

func (o *VMOps) wrapInto(ctx context.Context, kekRef KeyRef, dek *DEK, b Binding) (string, error) {
	kek, err := o.Keys.Get(ctx, kekRef)
	if err != nil {
		return "", err
	}
	locked, err := WrapDEK(kek, dek, b)
	if err != nil {
		return "", err
	}
	return EncodeKeySafe([]KeySafeEntry{{KEK: kekRef, Locked: locked}})
}

// task is one file to convert.
type task struct {
	path    string
	kind    Kind
	dek     *DEK // target key (encrypt, rekey) or current key (decrypt)
	old     *DEK // rekey: current key
	binding Binding
	embed   string // keySafe to embed in the header (every disk extent)
}

type keySet struct {
	vm    *DEK
	disks map[string]*DEK // by disk name
}

func (k *keySet) destroy() {
	if k == nil {
		return
	}
	k.vm.Destroy()
	for _, d := range k.disks {
		d.Destroy()
	}
}

// unwrapKeys unwraps the VM DEK of vmKS and the disk DEKs of disks (their
// old keySafes when old is set: the keys a journal says to convert from).
func (o *VMOps) unwrapKeys(ctx context.Context, vmID, vmKS string, disks []journalDisk, old bool) (*keySet, error) {
	ks := &keySet{disks: map[string]*DEK{}}
	var err error
	if ks.vm, _, err = o.unwrapFrom(ctx, vmKS, Binding{PurposeVM, vmID}); err != nil {
		return nil, fmt.Errorf("VM key: %w", err)
	}
	for _, d := range disks {
		s := d.KeySafe
		if old {
			s = d.OldKeySafe
		}
		dek, _, err := o.unwrapFrom(ctx, s, Binding{PurposeDisk, d.DiskID})
		if err != nil {
			ks.destroy()
			return nil, fmt.Errorf("disk %s key: %w", d.Name, err)
		}
		ks.disks[d.Name] = dek
	}
	return ks, nil
}

// tasks lists every data file of the layout with its key.
func tasks(l *vmLayout, ks *keySet, vmID string, jd []journalDisk) []task {
	var out []task
	byName := map[string]journalDisk{}
	for _, d := range jd {
		byName[d.Name] = d
	}
	for _, d := range l.Disks {
		j := byName[d.Name]
		for _, e := range d.Extents {
			// Every extent carries its disk's keySafe (FORMAT.md 3.4), so
			// a descriptor rewritten without its key lines (an editor,
			// qemu-img create over it) never takes the only copy with it.
			out = append(out, task{path: filepath.Join(l.Dir, e), kind: KindExtent, dek: ks.disks[d.Name],
				binding: Binding{PurposeDisk, j.DiskID}, embed: j.KeySafe})
		}
	}
	for _, f := range l.Files {
		out = append(out, task{path: filepath.Join(l.Dir, f.Name), kind: f.Kind, dek: ks.vm, binding: Binding{PurposeVM, vmID}})
	}
	return out
}

func (o *VMOps) progressor(op string, ts []task) (func(file string) ProgressFunc, error) {
	var total, done int64
	for _, t := range ts {
		st, err := os.Stat(t.path)
		if err != nil {
			return nil, err
		}
		total += st.Size()
	}
	return func(file string) ProgressFunc {
		return func(n int64) {
			done += n
			if o.Progress != nil {
				o.Progress(ProgressEvent{Op: op, File: filepath.Base(file), Done: done, Total: total})
			}
		}
	}, nil
}

// Encrypt encrypts a plain VM in place under the KEK kekRef: a fresh VM
// DEK, one DEK per disk, every data file converted, then the descriptors
// and the vmx rewritten. Re-running it after a crash finishes the job.
func (o *VMOps) Encrypt(ctx context.Context, dir string, kekRef KeyRef) error {
	j, l, err := begin(dir, "encrypt", o.CoreDumpPatterns)
	if err != nil {
		return err
	}
	if j == nil {
		if l.Encrypted {
			return fmt.Errorf("%s: VM is already encrypted", dir)
		}
		// Nothing, not even the journal, is written before every file
		// is known to be convertible.
		if err := o.precheckEncrypt(ctx, l); err != nil {
			return err
		}
		if j, err = o.newJournal(ctx, l, kekRef, "encrypt"); err != nil {
			return err
		}
	}
	ks, err := o.unwrapKeys(ctx, j.VMID, j.KeySafe, j.Disks, false)
	if err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	defer ks.destroy()
	ts := tasks(l, ks, j.VMID, j.Disks)
	prog, err := o.progressor("encrypt", ts)
	if err != nil {
		return err
	}
	for _, t := range ts {
		if t.dek == nil {
			return fmt.Errorf("%s: not in the interrupted encryption's journal (added after the interruption?); detach it or finish without it", t.path)
		}
		state, _, err := keyStateOf(t.path, t.dek)
		if err != nil {
			return err
		}
		switch state {
		case stateUnderKey:
			continue // converted before a crash
		case stateOtherKey:
			// Not under our key, so not converted yet: bytes that start
			// like a container, which a guest can write at the start of
			// its disk, and are encrypted as data; but never a real
			// container (see realContainer), which is what a disk that
			// lost its key lines holds.
			if _, real := o.realContainer(ctx, t.path); real {
				return fmt.Errorf("%s: already encrypted (a container whose key lines are missing) and not converted by this encryption; move it away or restore its key lines", t.path)
			}
		}
		opts := CreateOptions{Kind: t.kind, Binding: t.binding, Impl: o.Impl, EmbeddedKeySafe: t.embed}
		if err := encryptFile(ctx, t.path, t.dek, opts, prog(t.path), j.temp(dir)); err != nil {
			return err
		}
	}
	if err := o.coreDumps(ctx, l, true, j.temp(dir)); err != nil {
		return err
	}
	if err := o.writeDescriptors(l, j.Disks, true, j.writeText(dir)); err != nil {
		return err
	}
	if err := o.writeEncryptedVMX(l, j, ks.vm); err != nil {
		return err
	}
	return removeJournal(dir)
}

// begin is the common start of the converting operations: clean up what
// a killed run left, load the journal (refusing if another operation is
// unfinished) and read the VM's layout.
func begin(dir, op string, corePatterns []string) (*journal, *vmLayout, error) {
	j, err := loadJournal(dir)
	if err != nil {
		return nil, nil, err
	}
	if j != nil && j.Op != op {
		return nil, nil, fmt.Errorf("%s: a %s was interrupted; run it again to finish first, or abort it (--abort): %w", dir, j.Op, ErrConversionInterrupted)
	}
	if err := cleanStaleTemps(dir, j); err != nil {
		return nil, nil, err
	}
	l, err := loadLayout(dir, corePatterns)
	if err != nil {
		return nil, nil, err
	}
	return j, l, nil
}

// newBoundKey generates a DEK for a fresh owner id and wraps it under
// kekRef: what a new disk or core dump needs. The caller destroys the DEK.
func (o *VMOps) newBoundKey(ctx context.Context, kekRef KeyRef, p Purpose) (*DEK, Binding, string, error) {
	id, err := newID()
	if err != nil {
		return nil, Binding{}, "", err
	}
	dek, err := NewDEK()
	if err != nil {
		return nil, Binding{}, "", err
	}
	b := Binding{p, id}
	ks, err := o.wrapInto(ctx, kekRef, dek, b)
	if err != nil {
		dek.Destroy()
		return nil, Binding{}, "", err
	}
	return dek, b, ks, nil
}

// newJournal generates the keys of a fresh encryption (or deep rekey) and
// records them, wrapped, before any file changes.
func (o *VMOps) newJournal(ctx context.Context, l *vmLayout, kekRef KeyRef, op string) (*journal, error) {
	// A first encryption never trusts ids found in plain text files:
	// anyone who can edit them could make this VM's keys impersonate
	// another VM's. Decrypt and rekey keep the ids the keySafes are bound to.
	j := &journal{Op: op, VMID: l.VMID}
	if op == "encrypt" {
		j.VMID = ""
		for _, d := range l.Disks {
			d.DiskID = ""
		}
	}
	if j.VMID == "" {
		id, err := newID()
		if err != nil {
			return nil, err
		}
		j.VMID = id
	}
	vmDEK, err := NewDEK()
	if err != nil {
		return nil, err
	}
	defer vmDEK.Destroy()
	if j.KeySafe, err = o.wrapInto(ctx, kekRef, vmDEK, Binding{PurposeVM, j.VMID}); err != nil {
		return nil, err
	}
	if op == "rekey-deep" {
		j.OldKeySafe = l.KeySafe
	}
	for _, d := range l.Disks {
		jd := journalDisk{Name: d.Name, DiskID: d.DiskID}
		if op == "rekey-deep" {
			jd.OldKeySafe = d.KeySafe
		}
		if d.KeySafe == "" && op == "rekey-deep" {
			continue // a plain disk on an encrypted VM stays plain
		}
		if jd.DiskID == "" {
			if jd.DiskID, err = newID(); err != nil {
				return nil, err
			}
		}
		dek, err := NewDEK()
		if err != nil {
			return nil, err
		}
		jd.KeySafe, err = o.wrapInto(ctx, kekRef, dek, Binding{PurposeDisk, jd.DiskID})
		dek.Destroy()
		if err != nil {
			return nil, err
		}
		j.Disks = append(j.Disks, jd)
	}
	if err := j.save(l.Dir); err != nil {
		return nil, err
	}
	return j, nil
}

// checkKind refuses a container whose kind (from its authenticated
// header slot) does not fit the file it is converted as: files of one VM
// share the VM DEK, so a swap file renamed over the nvram would otherwise
// be decrypted (or rekeyed) as the nvram.
func checkKind(t task, kind Kind) error {
	if kind != t.kind {
		return fmt.Errorf("%s: %w: holds a %s container, its name says %s", t.path, ErrKindMismatch, kind, t.kind)
	}
	return nil
}

// writeDescriptors sets (or, for decrypt, removes) the encryption lines of
// every text descriptor.
func (o *VMOps) writeDescriptors(l *vmLayout, disks []journalDisk, encrypt bool, w textWriter) error {
	for _, jd := range disks {
		var d *disk
		for _, x := range l.Disks {
			if x.Name == jd.Name {
				d = x
			}
		}
		if d == nil || d.Embedded {
			continue
		}
		err := editDescriptorWith(filepath.Join(l.Dir, d.Name), func(desc *vmdk.Descriptor) error {
			if !encrypt {
				desc.Delete(DescKeySafe)
				desc.Delete(DDBDiskID)
				return nil
			}
			return setKeyLines(desc, jd.KeySafe, jd.DiskID)
		}, w)
		if err != nil {
			return err
		}
	}
	return nil
}

// settledLayout is the layout of the VM in dir for an operation that
// must not run while a conversion there is unfinished.
func settledLayout(dir string, corePatterns []string) (*vmLayout, error) {
	if op, err := InterruptedOp(dir); err != nil || op != "" {
		if err == nil {
			err = fmt.Errorf("%s: a %s was interrupted; finish it first: %w", dir, op, ErrConversionInterrupted)
		}
		return nil, err
	}
	return loadLayout(dir, corePatterns)
}

// editDescriptor rewrites the text descriptor at path, atomically, with
// edit's changes.
func editDescriptor(path string, edit func(*vmdk.Descriptor) error) error {
	return editDescriptorWith(path, edit, writeText)
}

// editDescriptorWith is editDescriptor writing with w.
func editDescriptorWith(path string, edit func(*vmdk.Descriptor) error, w textWriter) error {
	raw, err := readRegular(path, maxDescriptor)
	if err != nil {
		return err
	}
	desc, err := vmdk.ParseDescriptor(raw)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := edit(desc); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return w(path, desc.Bytes())
}

// setKeyLines sets a disk's two key lines (FORMAT.md 4.3).
func setKeyLines(desc *vmdk.Descriptor, keySafe, diskID string) error {
	if err := desc.Set(DescKeySafe, keySafe); err != nil {
		return err
	}
	return desc.Set(DDBDiskID, diskID)
}

// writeEncryptedVMX moves the sensitive lines into encryption.data and
// adds the key lines. Skipped when the vmx already carries this keySafe
// (a resumed conversion that got this far).
func (o *VMOps) writeEncryptedVMX(l *vmLayout, j *journal, vmDEK *DEK) error {
	if cur, _ := l.VMX.Get(VMXKeySafe); cur == j.KeySafe {
		return nil
	}
	rest, moved := vmx.ExtractSensitive(l.VMXText)
	cfg, err := vmx.Parse(rest)
	if err != nil {
		return fmt.Errorf("%s: %w", l.VMXPath, err)
	}
	set := func(k, v string) {
		if err == nil {
			err = cfg.Set(k, v)
		}
	}
	set(VMXVMID, j.VMID)
	set(VMXKeySafe, j.KeySafe)
	if len(moved) > 0 {
		data, serr := sealVMXData(vmDEK, j.VMID, moved)
		if serr != nil {
			return serr
		}
		set(VMXData, data)
	}
	policy := j.Policy
	if policy == "" {
		policy = PolicyEncrypt
	}
	set(VMXPolicy, policy)
	if err != nil {
		return fmt.Errorf("%s: %w", l.VMXPath, err)
	}
	out := cfg.Bytes()
	// Keep the file's final-newline convention: appending must not add a
	// newline that decryption (which deletes the appended lines) could not
	// tell from an original one.
	if len(l.VMXText) > 0 && !bytes.HasSuffix(l.VMXText, []byte("\n")) {
		out = bytes.TrimSuffix(out, []byte("\n"))
	}
	return j.writeText(l.Dir)(l.VMXPath, out)
}

// Decrypt turns an encrypted VM back into a plain one, byte for byte as it
// was before encryption (the vmx minus the encryption lines).
func (o *VMOps) Decrypt(ctx context.Context, dir string) error {
	j, l, err := begin(dir, "decrypt", o.CoreDumpPatterns)
	if err != nil {
		return err
	}
	resumed := j != nil
	if j == nil {
		if !l.Encrypted {
			return fmt.Errorf("%s: VM is not encrypted", dir)
		}
		j = &journal{Op: "decrypt", VMID: l.VMID, KeySafe: l.KeySafe, Policy: l.Policy}
		for _, d := range l.Disks {
			if d.KeySafe != "" {
				j.Disks = append(j.Disks, journalDisk{Name: d.Name, DiskID: d.DiskID, KeySafe: d.KeySafe})
			}
		}
	}
	// Keys first: a decrypt that cannot get its keys changes nothing, not
	// even the journal.
	ks, err := o.unwrapKeys(ctx, j.VMID, j.KeySafe, j.Disks, false)
	if err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	defer ks.destroy()
	var ts []task
	for _, t := range tasks(l, ks, j.VMID, j.Disks) {
		if t.dek != nil { // plain disks of an encrypted VM stay as they are
			ts = append(ts, t)
		}
	}
	if !resumed {
		if err := precheckConvert(l, "decrypt", ts); err != nil {
			return err
		}
		if err := o.precheckCoreDumps(ctx, l); err != nil {
			return err
		}
	}
	if err := j.save(dir); err != nil {
		return err
	}
	prog, err := o.progressor("decrypt", ts)
	if err != nil {
		return err
	}
	for _, t := range ts {
		state, kind, err := keyStateOf(t.path, t.dek)
		if err != nil {
			return err
		}
		switch state {
		case statePlain:
			continue // decrypted before a crash
		case stateOtherKey:
			// On a resumed decrypt this file may already be plain data
			// that starts like a container; on a first run every file
			// must open under the VM's keys.
			if !resumed {
				return fmt.Errorf("%s: encrypted with a key that is not this VM's or disk's", t.path)
			}
			continue
		}
		if err := checkKind(t, kind); err != nil {
			return err
		}
		if err := decryptFile(ctx, t.path, t.dek, prog(t.path), j.temp(dir)); err != nil {
			return err
		}
	}
	if err := o.coreDumps(ctx, l, false, j.temp(dir)); err != nil {
		return err
	}
	if err := o.writeDescriptors(l, j.Disks, false, j.writeText(dir)); err != nil {
		return err
	}
	if l.Encrypted {
		if err := o.writePlainVMX(l, j, ks.vm); err != nil {
			return err
		}
	}
	return removeJournal(dir)
}

func (o *VMOps) writePlainVMX(l *vmLayout, j *journal, vmDEK *DEK) error {
	var moved []vmx.MovedLine
	if data, ok := l.VMX.Get(VMXData); ok && data != "" {
		var err error
		if moved, err = openVMXData(vmDEK, j.VMID, data); err != nil {
			return fmt.Errorf("%s: %w", l.VMXPath, err)
		}
	}
	for _, k := range []string{VMXVMID, VMXKeySafe, VMXData, VMXPolicy} {
		l.VMX.Delete(k)
	}
	return j.writeText(l.Dir)(l.VMXPath, vmx.RestoreSensitive(l.VMX.Bytes(), moved))
}

// RekeyShallow rewraps every DEK of the VM under newKEK: only keySafes
// change, no data is touched, so it is allowed with snapshots. Each
// keySafe is replaced atomically; until the last one is rewritten the old
// KEK is still needed, which is why the keyring keeps it.
func (o *VMOps) RekeyShallow(ctx context.Context, dir string, newKEK KeyRef) error {
	l, err := settledLayout(dir, o.CoreDumpPatterns)
	if err != nil {
		return err
	}
	if !l.Encrypted {
		return fmt.Errorf("%s: VM is not encrypted", dir)
	}
	if err := convertErr(dir, "shallow rekey", layoutProblems(l)); err != nil {
		return err
	}
	// Every DEK unwrapped here is destroyed when the rekey returns: the
	// header copies are only rewritten in containers it authenticates.
	var deks []*DEK
	defer func() {
		for _, d := range deks {
			d.Destroy()
		}
	}()
	rewrap := func(ks string, b Binding) (string, [16]byte, *DEK, error) {
		dek, _, err := o.unwrapFrom(ctx, ks, b)
		if err != nil {
			return "", [16]byte{}, nil, err
		}
		deks = append(deks, dek)
		fp, err := DEKFingerprint(dek)
		if err != nil {
			return "", fp, nil, err
		}
		nks, err := o.wrapInto(ctx, newKEK, dek, b)
		return nks, fp, dek, err
	}
	// healthy refuses, before its keySafe copy is rewritten, a container
	// that does not authenticate under dek or is degraded (FORMAT.md 3.1:
	// every writer refuses a degraded container).
	healthy := func(path string, dek *DEK) error {
		c, err := OpenContainer(path, dek, true, o.Impl)
		if err != nil {
			return err
		}
		return c.Close()
	}
	for _, d := range l.Disks {
		if d.KeySafe == "" {
			continue
		}
		b := Binding{PurposeDisk, d.DiskID}
		nks, fp, dek, err := rewrap(d.KeySafe, b)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.Name, err)
		}
		path := filepath.Join(dir, d.Name)
		if d.Embedded {
			if err := healthy(path, dek); err != nil {
				return fmt.Errorf("disk %s: %w", d.Name, err)
			}
			if err := WriteEmbeddedKeySafe(path, nks); err != nil {
				return err
			}
			continue
		}
		// Extents carry a copy of the keySafe in their header
		// (FORMAT.md 3.4; files encrypted before that have none), which
		// a reader prefers: rewrap it first, so a crash leaves both
		// copies openable.
		// A copy is only replaced in an extent that is a regular file
		// holding this disk's DEK: anything else keeps its own copy,
		// and the rekey stops rather than lock it out.
		for _, e := range d.Extents {
			ep := filepath.Join(dir, e)
			head, err := regularHead(ep)
			if err != nil {
				return fmt.Errorf("disk %s: extent %s: %w", d.Name, e, err)
			}
			h, err := PeekHeader(head)
			if err != nil {
				continue // not a container: nothing to rewrap
			}
			if h.Binding != b || h.Fingerprint != fp {
				return fmt.Errorf("disk %s: extent %s holds another disk's key; not rekeyed", d.Name, e)
			}
			if err := healthy(ep, dek); err != nil {
				return fmt.Errorf("disk %s: %w", d.Name, err)
			}
			// An extent encrypted before extents carried a copy gets
			// one now (FORMAT.md 3.4).
			if err := WriteEmbeddedKeySafe(ep, nks); err != nil {
				return err
			}
		}
		if err := editDescriptor(path, func(desc *vmdk.Descriptor) error { return desc.Set(DescKeySafe, nks) }); err != nil {
			return err
		}
	}
	nks, _, _, err := rewrap(l.KeySafe, Binding{PurposeVM, l.VMID})
	if err != nil {
		return fmt.Errorf("VM key: %w", err)
	}
	if err := l.VMX.Set(VMXKeySafe, nks); err != nil {
		return err
	}
	return writeText(l.VMXPath, l.VMX.Bytes())
}

// RekeyDeep replaces every DEK and re-encrypts all data under kekRef. It
// is refused while the VM has snapshots.
func (o *VMOps) RekeyDeep(ctx context.Context, dir string, kekRef KeyRef) error {
	j, l, err := begin(dir, "rekey-deep", o.CoreDumpPatterns)
	if err != nil {
		return err
	}
	if j == nil {
		if !l.Encrypted {
			return fmt.Errorf("%s: VM is not encrypted", dir)
		}
		if l.Snapshots > 0 {
			return fmt.Errorf("%s: deep rekey is not allowed while the VM has snapshots (%d); a shallow rekey is", dir, l.Snapshots)
		}
		// The current keys must be at hand before anything is written.
		var cur []journalDisk
		for _, d := range l.Disks {
			if d.KeySafe != "" {
				cur = append(cur, journalDisk{Name: d.Name, DiskID: d.DiskID, KeySafe: d.KeySafe})
			}
		}
		probe, err := o.unwrapKeys(ctx, l.VMID, l.KeySafe, cur, false)
		if err != nil {
			return fmt.Errorf("%s: current keys: %w", dir, err)
		}
		var pts []task
		for _, t := range tasks(l, probe, l.VMID, cur) {
			if t.dek != nil {
				pts = append(pts, t)
			}
		}
		err = precheckConvert(l, "deep rekey", pts)
		probe.destroy()
		if err != nil {
			return err
		}
		if j, err = o.newJournal(ctx, l, kekRef, "rekey-deep"); err != nil {
			return err
		}
	}
	newKeys, err := o.unwrapKeys(ctx, j.VMID, j.KeySafe, j.Disks, false)
	if err != nil {
		return fmt.Errorf("%s: new keys: %w", dir, err)
	}
	defer newKeys.destroy()
	oldKeys, err := o.unwrapKeys(ctx, j.VMID, j.OldKeySafe, j.Disks, true)
	if err != nil {
		return fmt.Errorf("%s: old keys: %w", dir, err)
	}
	defer oldKeys.destroy()
	newTasks := tasks(l, newKeys, j.VMID, j.Disks)
	oldTasks := tasks(l, oldKeys, j.VMID, j.Disks)
	var ts []task
	for i := range newTasks {
		if newTasks[i].dek == nil {
			continue
		}
		t := newTasks[i]
		t.old = oldTasks[i].dek
		ts = append(ts, t)
	}
	prog, err := o.progressor("rekey-deep", ts)
	if err != nil {
		return err
	}
	for _, t := range ts {
		state, _, err := keyStateOf(t.path, t.dek)
		if err != nil {
			return err
		}
		if state == stateUnderKey {
			continue
		}
		// Not rekeyed yet: the kind is that of the slot the old key
		// authenticates.
		state, kind, err := keyStateOf(t.path, t.old)
		if err != nil {
			return err
		}
		if state == stateUnderKey {
			if err := checkKind(t, kind); err != nil {
				return err
			}
		}
		opts := CreateOptions{Kind: t.kind, Binding: t.binding, Impl: o.Impl, EmbeddedKeySafe: t.embed}
		if err := rekeyFile(ctx, t.path, t.old, t.dek, opts, prog(t.path), j.temp(dir)); err != nil {
			return err
		}
	}
	if err := o.writeDescriptors(l, j.Disks, true, j.writeText(dir)); err != nil {
		return err
	}
	// The vmx bundle moves from the old VM key to the new one.
	if cur, _ := l.VMX.Get(VMXKeySafe); cur != j.KeySafe {
		if err := rekeyVMX(l, j.VMID, oldKeys.vm, newKeys.vm, j.KeySafe, j.writeText(dir)); err != nil {
			return err
		}
	}
	return removeJournal(dir)
}

package vmops

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/xts"
)

// VMOps runs the VM lifecycle operations. Each operation that converts
// data (encrypt, decrypt, deep rekey) writes a journal first and can be
// re-run after a crash: files already converted are recognised by their
// header and skipped, the rest are converted, and text files are
// rewritten last.
type VMOps struct {
	Keys     *keys.Keyring
	Impl     xts.Impl
	Log      *slog.Logger
	Progress func(ProgressEvent) // may be nil
	// HostKEK is the host encryption mode key; core dumps are encrypted
	// under it. Nil when the mode is off.
	HostKEK *keys.KeyRef
	// CoreDumpPatterns are extra file-name patterns of core dumps.
	CoreDumpPatterns []string
}

// ProgressEvent reports conversion progress.
type ProgressEvent struct {
	Op    vm.Op
	File  string
	Done  int64 // bytes of all files so far
	Total int64 // bytes of all files to convert
}

// unwrapFrom unwraps the DEK of a keySafe, trying each pair's KEK.
func (o *VMOps) unwrapFrom(ctx context.Context, ks string, b keys.Binding) (*keys.DEK, keys.KeyRef, error) {
	entries, err := keys.DecodeKeySafe(ks)
	if err != nil {
		return nil, keys.KeyRef{}, err
	}
	var errs []error
	for _, e := range entries {
		kek, err := o.Keys.Get(ctx, e.KEK)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		dek, err := keys.UnwrapDEK(kek, e.Locked, b)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		return dek, e.KEK, nil
	}
	return nil, keys.KeyRef{}, errors.Join(errs...)
}

func (o *VMOps) wrapInto(ctx context.Context, kekRef keys.KeyRef, dek *keys.DEK, b keys.Binding) (string, error) {
	kek, err := o.Keys.Get(ctx, kekRef)
	if err != nil {
		return "", err
	}
	locked, err := keys.WrapDEK(kek, dek, b)
	if err != nil {
		return "", err
	}
	return keys.EncodeKeySafe([]keys.KeySafeEntry{{KEK: kekRef, Locked: locked}})
}

// task is one file to convert.
type task struct {
	path    string
	kind    container.Kind
	dek     *keys.DEK // target key (encrypt, rekey) or current key (decrypt)
	old     *keys.DEK // rekey: current key
	binding keys.Binding
	embed   string // keySafe to embed in the header (every disk extent)
}

type keySet struct {
	vm    *keys.DEK
	disks map[string]*keys.DEK // by disk name
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
func (o *VMOps) unwrapKeys(ctx context.Context, vmID, vmKS string, disks []vm.JournalDisk, old bool) (*keySet, error) {
	ks := &keySet{disks: map[string]*keys.DEK{}}
	var err error
	if ks.vm, _, err = o.unwrapFrom(ctx, vmKS, keys.Binding{Purpose: keys.PurposeVM, OwnerID: vmID}); err != nil {
		return nil, fmt.Errorf("VM key: %w", err)
	}
	for _, d := range disks {
		s := d.KeySafe
		if old {
			s = d.OldKeySafe
		}
		dek, _, err := o.unwrapFrom(ctx, s, keys.Binding{Purpose: keys.PurposeDisk, OwnerID: d.DiskID})
		if err != nil {
			ks.destroy()
			return nil, fmt.Errorf("disk %s key: %w", d.Name, err)
		}
		ks.disks[d.Name] = dek
	}
	return ks, nil
}

// tasks lists every data file of the layout with its key.
func tasks(l *vm.Layout, ks *keySet, vmID string, jd []vm.JournalDisk) []task {
	var out []task
	byName := map[string]vm.JournalDisk{}
	for _, d := range jd {
		byName[d.Name] = d
	}
	for _, d := range l.Disks {
		j := byName[d.Name]
		for _, e := range d.Extents {
			// Every extent carries its disk's keySafe (FORMAT.md 3.4), so
			// a descriptor rewritten without its key lines (an editor,
			// qemu-img create over it) never takes the only copy with it.
			out = append(out, task{path: filepath.Join(l.Dir, e), kind: container.KindExtent, dek: ks.disks[d.Name],
				binding: keys.Binding{Purpose: keys.PurposeDisk, OwnerID: j.DiskID}, embed: j.KeySafe})
		}
	}
	for _, f := range l.Files {
		out = append(out, task{path: filepath.Join(l.Dir, f.Name), kind: f.Kind, dek: ks.vm, binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: vmID}})
	}
	return out
}

func (o *VMOps) progressor(op vm.Op, ts []task) (func(file string) container.ProgressFunc, error) {
	var total, done int64
	for _, t := range ts {
		st, err := os.Stat(t.path)
		if err != nil {
			return nil, err
		}
		total += st.Size()
	}
	return func(file string) container.ProgressFunc {
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
func (o *VMOps) Encrypt(ctx context.Context, dir string, kekRef keys.KeyRef) error {
	j, l, err := begin(dir, vm.OpEncrypt, o.CoreDumpPatterns)
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
		if j, err = o.newJournal(ctx, l, kekRef, vm.OpEncrypt); err != nil {
			return err
		}
	}
	ks, err := o.unwrapKeys(ctx, j.VMID, j.KeySafe, j.Disks, false)
	if err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	defer ks.destroy()
	ts := tasks(l, ks, j.VMID, j.Disks)
	prog, err := o.progressor(vm.OpEncrypt, ts)
	if err != nil {
		return err
	}
	for _, t := range ts {
		if t.dek == nil {
			return fmt.Errorf("%s: not in the interrupted encryption's journal (added after the interruption?); detach it or finish without it", t.path)
		}
		state, _, err := container.KeyStateOf(t.path, t.dek)
		if err != nil {
			return err
		}
		switch state {
		case container.StateUnderKey:
			continue // converted before a crash
		case container.StateOtherKey:
			// Not under our key, so not converted yet: bytes that start
			// like a container, which a guest can write at the start of
			// its disk, and are encrypted as data; but never a real
			// container (see realContainer), which is what a disk that
			// lost its key lines holds.
			if _, real := o.realContainer(ctx, t.path); real {
				return fmt.Errorf("%s: already encrypted (a container whose key lines are missing) and not converted by this encryption; move it away or restore its key lines", t.path)
			}
		}
		opts := container.CreateOptions{Kind: t.kind, Binding: t.binding, Impl: o.Impl, EmbeddedKeySafe: t.embed}
		if err := container.EncryptFileTemp(ctx, t.path, t.dek, opts, prog(t.path), j.Temp(dir)); err != nil {
			return err
		}
	}
	if err := o.coreDumps(ctx, l, true, j.Temp(dir)); err != nil {
		return err
	}
	if err := o.writeDescriptors(l, j.Disks, true, j.WriteText(dir)); err != nil {
		return err
	}
	if err := o.writeEncryptedVMX(l, j, ks.vm); err != nil {
		return err
	}
	return vm.RemoveJournal(dir)
}

// begin is the common start of the converting operations: clean up what
// a killed run left, load the journal (refusing if another operation is
// unfinished) and read the VM's layout.
func begin(dir string, op vm.Op, corePatterns []string) (*vm.Journal, *vm.Layout, error) {
	j, err := vm.LoadJournal(dir)
	if err != nil {
		return nil, nil, err
	}
	if j != nil && j.Op != op {
		return nil, nil, fmt.Errorf("%s: a %s was interrupted; run it again to finish first, or abort it (--abort): %w", dir, j.Op, vm.ErrConversionInterrupted)
	}
	if err := vm.CleanStaleTemps(dir, j); err != nil {
		return nil, nil, err
	}
	l, err := vm.LoadLayout(dir, corePatterns)
	if err != nil {
		return nil, nil, err
	}
	return j, l, nil
}

// newBoundKey generates a DEK for a fresh owner id and wraps it under
// kekRef: what a new disk or core dump needs. The caller destroys the DEK.
func (o *VMOps) newBoundKey(ctx context.Context, kekRef keys.KeyRef, p keys.Purpose) (*keys.DEK, keys.Binding, string, error) {
	id, err := vm.NewID()
	if err != nil {
		return nil, keys.Binding{}, "", err
	}
	dek, err := keys.NewDEK()
	if err != nil {
		return nil, keys.Binding{}, "", err
	}
	b := keys.Binding{Purpose: p, OwnerID: id}
	ks, err := o.wrapInto(ctx, kekRef, dek, b)
	if err != nil {
		dek.Destroy()
		return nil, keys.Binding{}, "", err
	}
	return dek, b, ks, nil
}

// newJournal generates the keys of a fresh encryption (or deep rekey) and
// records them, wrapped, before any file changes.
func (o *VMOps) newJournal(ctx context.Context, l *vm.Layout, kekRef keys.KeyRef, op vm.Op) (*vm.Journal, error) {
	// A first encryption never trusts ids found in plain text files:
	// anyone who can edit them could make this VM's keys impersonate
	// another VM's. Decrypt and rekey keep the ids the keySafes are bound to.
	j := &vm.Journal{Op: op, VMID: l.VMID}
	if op == vm.OpEncrypt {
		j.VMID = ""
		for _, d := range l.Disks {
			d.DiskID = ""
		}
	}
	if j.VMID == "" {
		id, err := vm.NewID()
		if err != nil {
			return nil, err
		}
		j.VMID = id
	}
	vmDEK, err := keys.NewDEK()
	if err != nil {
		return nil, err
	}
	defer vmDEK.Destroy()
	if j.KeySafe, err = o.wrapInto(ctx, kekRef, vmDEK, keys.Binding{Purpose: keys.PurposeVM, OwnerID: j.VMID}); err != nil {
		return nil, err
	}
	if op == vm.OpRekeyDeep {
		j.OldKeySafe = l.KeySafe
	}
	for _, d := range l.Disks {
		jd := vm.JournalDisk{Name: d.Name, DiskID: d.DiskID}
		if op == vm.OpRekeyDeep {
			jd.OldKeySafe = d.KeySafe
		}
		if d.KeySafe == "" && op == vm.OpRekeyDeep {
			continue // a plain disk on an encrypted VM stays plain
		}
		if jd.DiskID == "" {
			if jd.DiskID, err = vm.NewID(); err != nil {
				return nil, err
			}
		}
		dek, err := keys.NewDEK()
		if err != nil {
			return nil, err
		}
		jd.KeySafe, err = o.wrapInto(ctx, kekRef, dek, keys.Binding{Purpose: keys.PurposeDisk, OwnerID: jd.DiskID})
		dek.Destroy()
		if err != nil {
			return nil, err
		}
		j.Disks = append(j.Disks, jd)
	}
	if err := j.Save(l.Dir); err != nil {
		return nil, err
	}
	return j, nil
}

// checkKind refuses a container whose kind (from its authenticated
// header slot) does not fit the file it is converted as: files of one VM
// share the VM DEK, so a swap file renamed over the nvram would otherwise
// be decrypted (or rekeyed) as the nvram.
func checkKind(t task, kind container.Kind) error {
	if kind != t.kind {
		return fmt.Errorf("%s: %w: holds a %s container, its name says %s", t.path, container.ErrKindMismatch, kind, t.kind)
	}
	return nil
}

// settledLayout is the layout of the VM in dir for an operation that
// must not run while a conversion there is unfinished.
func settledLayout(dir string, corePatterns []string) (*vm.Layout, error) {
	if op, err := vm.InterruptedOp(dir); err != nil || op != "" {
		if err == nil {
			err = fmt.Errorf("%s: a %s was interrupted; finish it first: %w", dir, op, vm.ErrConversionInterrupted)
		}
		return nil, err
	}
	return vm.LoadLayout(dir, corePatterns)
}

// Decrypt turns an encrypted VM back into a plain one, byte for byte as it
// was before encryption (the vmx minus the encryption lines).
func (o *VMOps) Decrypt(ctx context.Context, dir string) error {
	j, l, err := begin(dir, vm.OpDecrypt, o.CoreDumpPatterns)
	if err != nil {
		return err
	}
	resumed := j != nil
	if j == nil {
		if !l.Encrypted {
			return fmt.Errorf("%s: VM is not encrypted", dir)
		}
		j = &vm.Journal{Op: vm.OpDecrypt, VMID: l.VMID, KeySafe: l.KeySafe, Policy: l.Policy}
		for _, d := range l.Disks {
			if d.KeySafe != "" {
				j.Disks = append(j.Disks, vm.JournalDisk{Name: d.Name, DiskID: d.DiskID, KeySafe: d.KeySafe})
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
		if err := precheckConvert(l, vm.OpDecrypt, ts); err != nil {
			return err
		}
		if err := o.precheckCoreDumps(ctx, l); err != nil {
			return err
		}
	}
	if err := j.Save(dir); err != nil {
		return err
	}
	prog, err := o.progressor(vm.OpDecrypt, ts)
	if err != nil {
		return err
	}
	for _, t := range ts {
		state, kind, err := container.KeyStateOf(t.path, t.dek)
		if err != nil {
			return err
		}
		switch state {
		case container.StatePlain:
			continue // decrypted before a crash
		case container.StateOtherKey:
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
		if err := container.DecryptFileTemp(ctx, t.path, t.dek, prog(t.path), j.Temp(dir)); err != nil {
			return err
		}
	}
	if err := o.coreDumps(ctx, l, false, j.Temp(dir)); err != nil {
		return err
	}
	if err := o.writeDescriptors(l, j.Disks, false, j.WriteText(dir)); err != nil {
		return err
	}
	if l.Encrypted {
		if err := o.writePlainVMX(l, j, ks.vm); err != nil {
			return err
		}
	}
	return vm.RemoveJournal(dir)
}

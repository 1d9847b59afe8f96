package vmops

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
)

// Abort rolls an interrupted conversion (vm.OpEncrypt, vm.OpDecrypt or
// vm.OpRekeyDeep) in dir back to the state before it started, as LUKS2 can
// roll back a reencryption: every file already converted is converted
// back with the keys its journal holds (wrapped), text files get their
// previous key lines back, and the journal goes last. Each file is
// converted with the same crash-safe copy-and-rename as the forward
// direction, and an abort that is itself interrupted can be re-run (or
// the conversion resumed instead): every step first looks at the file's
// state.
//
// What it cannot restore byte for byte: a vmx whose encryption.data is
// sealed again (same lines, new nonce) and containers made again (same
// keys and data, new file ids). Core dumps the operation converted (they
// are converted last, under the host key) stay as they are.
func (o *VMOps) Abort(ctx context.Context, dir string, op vm.Op) error {
	j, err := vm.LoadJournal(dir)
	if err != nil {
		return err
	}
	if j == nil {
		return fmt.Errorf("%s: no interrupted conversion to abort", dir)
	}
	if j.Op != op {
		return fmt.Errorf("%s: the interrupted conversion is a %s, not a %s; abort that one", dir, j.Op, op)
	}
	if err := vm.CleanStaleTemps(dir, j); err != nil {
		return err
	}
	l, err := vm.LoadLayout(dir, o.CoreDumpPatterns)
	if err != nil {
		return err
	}
	switch op {
	case vm.OpEncrypt:
		err = o.abortEncrypt(ctx, l, j)
	case vm.OpDecrypt:
		err = o.abortDecrypt(ctx, l, j)
	case vm.OpRekeyDeep:
		err = o.abortRekey(ctx, l, j)
	default:
		err = fmt.Errorf("%s: unknown conversion %q", dir, op)
	}
	if err != nil {
		return fmt.Errorf("abort %s: %w", op, err)
	}
	return vm.RemoveJournal(dir)
}

// abortEncrypt decrypts what the encryption converted, then removes the
// key lines it wrote.
func (o *VMOps) abortEncrypt(ctx context.Context, l *vm.Layout, j *vm.Journal) error {
	ks, err := o.unwrapKeys(ctx, j.VMID, j.KeySafe, j.Disks, false)
	if err != nil {
		return fmt.Errorf("%s: %w", l.Dir, err)
	}
	defer ks.destroy()
	ts := withKeys(tasks(l, ks, j.VMID, j.Disks))
	prog, err := o.progressor("abort-encrypt", ts)
	if err != nil {
		return err
	}
	for _, t := range ts {
		state, kind, err := container.KeyStateOf(t.path, t.dek)
		if err != nil {
			return err
		}
		if state != container.StateUnderKey {
			continue // not converted yet (or not ours)
		}
		if err := checkKind(t, kind); err != nil {
			return err
		}
		if err := container.DecryptFileTemp(ctx, t.path, t.dek, prog(t.path), j.Temp(l.Dir)); err != nil {
			return err
		}
	}
	for _, jd := range j.Disks {
		if err := editKeyLines(l, j, jd.Name, jd.KeySafe, func(desc *vmdk.Descriptor) error {
			desc.Delete(vm.DescKeySafe)
			desc.Delete(vm.DDBDiskID)
			return nil
		}); err != nil {
			return err
		}
	}
	if cur, _ := l.VMX.Get(vm.VMXKeySafe); cur == j.KeySafe {
		return o.writePlainVMX(l, j, ks.vm)
	}
	return nil
}

// abortDecrypt encrypts again, under the VM's own keys, what the decrypt
// converted, then puts the key lines back.
func (o *VMOps) abortDecrypt(ctx context.Context, l *vm.Layout, j *vm.Journal) error {
	ks, err := o.unwrapKeys(ctx, j.VMID, j.KeySafe, j.Disks, false)
	if err != nil {
		return fmt.Errorf("%s: %w", l.Dir, err)
	}
	defer ks.destroy()
	ts := withKeys(tasks(l, ks, j.VMID, j.Disks))
	prog, err := o.progressor("abort-decrypt", ts)
	if err != nil {
		return err
	}
	for _, t := range ts {
		state, _, err := container.KeyStateOf(t.path, t.dek)
		if err != nil {
			return err
		}
		if state == container.StateUnderKey {
			continue // not decrypted yet
		}
		// Plain now: the decrypt's first run checked that every one of
		// these files was a container under its key, so this is its
		// output (even if a guest's bytes start like a container).
		opts := container.CreateOptions{Kind: t.kind, Binding: t.binding, Impl: o.Impl, EmbeddedKeySafe: t.embed}
		if err := container.EncryptFileTemp(ctx, t.path, t.dek, opts, prog(t.path), j.Temp(l.Dir)); err != nil {
			return err
		}
	}
	for _, jd := range j.Disks {
		if err := editKeyLines(l, j, jd.Name, "", func(desc *vmdk.Descriptor) error {
			return vm.SetKeyLines(desc, jd.KeySafe, jd.DiskID)
		}); err != nil {
			return err
		}
	}
	if cur, _ := l.VMX.Get(vm.VMXKeySafe); cur != j.KeySafe {
		return o.writeEncryptedVMX(l, j, ks.vm)
	}
	return nil
}

// abortRekey re-encrypts under the old keys what the deep rekey moved to
// the new ones, then puts the old key lines back.
func (o *VMOps) abortRekey(ctx context.Context, l *vm.Layout, j *vm.Journal) error {
	newKeys, err := o.unwrapKeys(ctx, j.VMID, j.KeySafe, j.Disks, false)
	if err != nil {
		return fmt.Errorf("%s: new keys: %w", l.Dir, err)
	}
	defer newKeys.destroy()
	oldKeys, err := o.unwrapKeys(ctx, j.VMID, j.OldKeySafe, j.Disks, true)
	if err != nil {
		return fmt.Errorf("%s: old keys: %w", l.Dir, err)
	}
	defer oldKeys.destroy()
	// The journal's old keySafes are what the extents' header copies and
	// the descriptors held before.
	old := make([]vm.JournalDisk, len(j.Disks))
	for i, jd := range j.Disks {
		old[i] = vm.JournalDisk{Name: jd.Name, DiskID: jd.DiskID, KeySafe: jd.OldKeySafe}
	}
	oldTasks := tasks(l, oldKeys, j.VMID, old)
	newTasks := tasks(l, newKeys, j.VMID, j.Disks)
	var ts []task
	for i, t := range oldTasks {
		if t.dek == nil {
			continue
		}
		t.old = newTasks[i].dek
		ts = append(ts, t)
	}
	prog, err := o.progressor("abort-rekey-deep", ts)
	if err != nil {
		return err
	}
	for _, t := range ts {
		state, kind, err := container.KeyStateOf(t.path, t.old)
		if err != nil {
			return err
		}
		if state != container.StateUnderKey {
			continue // still under the old key
		}
		if err := checkKind(t, kind); err != nil {
			return err
		}
		opts := container.CreateOptions{Kind: t.kind, Binding: t.binding, Impl: o.Impl, EmbeddedKeySafe: t.embed}
		if err := container.RekeyFileTemp(ctx, t.path, t.old, t.dek, opts, prog(t.path), j.Temp(l.Dir)); err != nil {
			return err
		}
	}
	for _, jd := range j.Disks {
		if err := editKeyLines(l, j, jd.Name, jd.KeySafe, func(desc *vmdk.Descriptor) error {
			return vm.SetKeyLines(desc, jd.OldKeySafe, jd.DiskID)
		}); err != nil {
			return err
		}
	}
	if cur, _ := l.VMX.Get(vm.VMXKeySafe); cur == j.KeySafe {
		return rekeyVMX(l, j.VMID, newKeys.vm, oldKeys.vm, j.OldKeySafe, j.WriteText(l.Dir))
	}
	return nil
}

// withKeys keeps the tasks that have a key (plain disks of an encrypted
// VM are not converted).
func withKeys(ts []task) []task {
	var out []task
	for _, t := range ts {
		if t.dek != nil {
			out = append(out, t)
		}
	}
	return out
}

// editKeyLines applies edit to the text descriptor of disk name in l when
// its encryptionKeys line is want ("": when it has none); embedded
// descriptors (the key is in the header) and descriptors in any other
// state are left alone.
func editKeyLines(l *vm.Layout, j *vm.Journal, name, want string, edit func(*vmdk.Descriptor) error) error {
	for _, d := range l.Disks {
		if d.Name != name || d.Embedded || d.KeySafe != want {
			continue
		}
		return editDescriptorWith(filepath.Join(l.Dir, d.Name), edit, j.WriteText(l.Dir))
	}
	return nil
}

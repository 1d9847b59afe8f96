package vmops

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
)

// Key rotation: shallow (new KEK, DEKs rewrapped) and deep (new DEKs, every
// file converted under a journal).

// RekeyShallow rewraps every DEK of the VM under newKEK: only keySafes
// change, no data is touched, so it is allowed with snapshots. Each
// keySafe is replaced atomically; until the last one is rewritten the old
// KEK is still needed, which is why the keyring keeps it.
func (o *VMOps) RekeyShallow(ctx context.Context, dir string, newKEK keys.KeyRef) error {
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
	var deks []*keys.DEK
	defer func() {
		for _, d := range deks {
			d.Destroy()
		}
	}()
	rewrap := func(ks string, b keys.Binding) (string, [16]byte, *keys.DEK, error) {
		dek, _, err := o.unwrapFrom(ctx, ks, b)
		if err != nil {
			return "", [16]byte{}, nil, err
		}
		deks = append(deks, dek)
		fp, err := container.DEKFingerprint(dek)
		if err != nil {
			return "", fp, nil, err
		}
		nks, err := o.wrapInto(ctx, newKEK, dek, b)
		return nks, fp, dek, err
	}
	// healthy refuses, before its keySafe copy is rewritten, a container
	// that does not authenticate under dek or is degraded (FORMAT.md 3.1:
	// every writer refuses a degraded container).
	healthy := func(path string, dek *keys.DEK) error {
		c, err := container.OpenContainer(path, dek, true, o.Impl)
		if err != nil {
			return err
		}
		return c.Close()
	}
	for _, d := range l.Disks {
		if d.KeySafe == "" {
			continue
		}
		b := keys.Binding{Purpose: keys.PurposeDisk, OwnerID: d.DiskID}
		nks, fp, dek, err := rewrap(d.KeySafe, b)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.Name, err)
		}
		path := filepath.Join(dir, d.Name)
		if d.Embedded {
			if err := healthy(path, dek); err != nil {
				return fmt.Errorf("disk %s: %w", d.Name, err)
			}
			if err := container.WriteEmbeddedKeySafe(path, nks); err != nil {
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
			head, err := vm.RegularHead(ep)
			if err != nil {
				return fmt.Errorf("disk %s: extent %s: %w", d.Name, e, err)
			}
			h, err := container.PeekHeader(head)
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
			if err := container.WriteEmbeddedKeySafe(ep, nks); err != nil {
				return err
			}
		}
		if err := EditDescriptor(path, func(desc *vmdk.Descriptor) error { return desc.Set(vm.DescKeySafe, nks) }); err != nil {
			return err
		}
	}
	nks, _, _, err := rewrap(l.KeySafe, keys.Binding{Purpose: keys.PurposeVM, OwnerID: l.VMID})
	if err != nil {
		return fmt.Errorf("VM key: %w", err)
	}
	if err := l.VMX.Set(vm.VMXKeySafe, nks); err != nil {
		return err
	}
	return vm.WriteText(l.VMXPath, l.VMX.Bytes())
}

// RekeyDeep replaces every DEK and re-encrypts all data under kekRef. It
// is refused while the VM has snapshots.
func (o *VMOps) RekeyDeep(ctx context.Context, dir string, kekRef keys.KeyRef) error {
	j, l, err := begin(dir, vm.OpRekeyDeep, o.CoreDumpPatterns)
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
		var cur []vm.JournalDisk
		for _, d := range l.Disks {
			if d.KeySafe != "" {
				cur = append(cur, vm.JournalDisk{Name: d.Name, DiskID: d.DiskID, KeySafe: d.KeySafe})
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
		if j, err = o.newJournal(ctx, l, kekRef, vm.OpRekeyDeep); err != nil {
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
	prog, err := o.progressor(vm.OpRekeyDeep, ts)
	if err != nil {
		return err
	}
	for _, t := range ts {
		state, _, err := container.KeyStateOf(t.path, t.dek)
		if err != nil {
			return err
		}
		if state == container.StateUnderKey {
			continue
		}
		// Not rekeyed yet: the kind is that of the slot the old key
		// authenticates.
		state, kind, err := container.KeyStateOf(t.path, t.old)
		if err != nil {
			return err
		}
		if state == container.StateUnderKey {
			if err := checkKind(t, kind); err != nil {
				return err
			}
		}
		opts := container.CreateOptions{Kind: t.kind, Binding: t.binding, Impl: o.Impl, EmbeddedKeySafe: t.embed}
		if err := container.RekeyFileTemp(ctx, t.path, t.old, t.dek, opts, prog(t.path), j.Temp(dir)); err != nil {
			return err
		}
	}
	if err := o.writeDescriptors(l, j.Disks, true, j.WriteText(dir)); err != nil {
		return err
	}
	// The vmx bundle moves from the old VM key to the new one.
	if cur, _ := l.VMX.Get(vm.VMXKeySafe); cur != j.KeySafe {
		if err := rekeyVMX(l, j.VMID, oldKeys.vm, newKeys.vm, j.KeySafe, j.WriteText(dir)); err != nil {
			return err
		}
	}
	return vm.RemoveJournal(dir)
}

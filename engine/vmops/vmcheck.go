package vmops

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// CheckFinding is one problem `vmcryptd vm check` found in a VM
// directory: the file it concerns ("" for the VM as a whole), what is
// wrong, and whether --repair knows a safe fix.
type CheckFinding struct {
	File       string
	Problem    string
	Repairable bool

	fix func() (string, error)
}

// CheckReport is the result of VMOps.Check: what was repaired (with
// --repair) and the findings that remain. A VM is healthy when Findings
// is empty.
type CheckReport struct {
	Dir      string
	Checked  int
	Repaired []string
	Findings []CheckFinding
}

// Check verifies an encrypted or plain VM against its own text files:
// every container where the vmx and descriptors say one belongs opens
// under the key they name, with both header slots intact and equal
// (FORMAT.md 3.1), the kind its name requires, the owner binding its
// text files give, and no truncation; disks have their key lines; and
// whatever vm status reports as a problem. With repair it applies the
// fixes that need no guess: a damaged or stale header slot is rewritten
// from the authenticated one (only when that slot's size covers every
// data unit in the file, or a flat extent's descriptor gives the size),
// and lost key lines are restored from the extents' keySafe copy
// (RestoreDiskKeys' checks); then it checks again and reports what is
// left. Check changes nothing without repair.
func (o *VMOps) Check(ctx context.Context, dir string, repair bool) (*CheckReport, error) {
	rep := &CheckReport{Dir: dir, Findings: []CheckFinding{}}
	// The DEKs outlive the first scan: its fixes use them.
	deks := map[string]*keys.DEK{}
	defer func() {
		for _, d := range deks {
			d.Destroy()
		}
	}()
	found, checked := o.scan(ctx, dir, deks)
	if !repair {
		rep.Checked, rep.Findings = checked, append(rep.Findings, found...)
		return rep, nil
	}
	for _, f := range found {
		if f.fix == nil {
			continue
		}
		what, err := f.fix()
		if err != nil {
			// Not fixed: the rescan below reports the problem again; the
			// reason the fix refused belongs with it.
			rep.Repaired = append(rep.Repaired, fmt.Sprintf("%s: not repaired: %v", f.File, err))
			continue
		}
		rep.Repaired = append(rep.Repaired, f.File+": "+what)
	}
	found, checked = o.scan(ctx, dir, deks)
	rep.Checked, rep.Findings = checked, append(rep.Findings, found...)
	return rep, nil
}

// scan gathers the findings of one pass and counts the containers it
// authenticated; deks caches unwrapped DEKs for the caller to destroy.
func (o *VMOps) scan(ctx context.Context, dir string, deks map[string]*keys.DEK) ([]CheckFinding, int) {
	var out []CheckFinding
	add := func(file, problem string, fix func() (string, error)) {
		out = append(out, CheckFinding{File: file, Problem: problem, Repairable: fix != nil, fix: fix})
	}
	if op, err := vm.InterruptedOp(dir); err != nil {
		add("", fmt.Sprintf("cannot read the conversion journal: %v", err), nil)
		return out, 0
	} else if op != "" {
		add("", fmt.Sprintf("a %s was interrupted: re-run `vmcryptd vm %s` to finish it (or --abort it) before checking", op, op), nil)
		return out, 0
	}
	l, err := vm.LoadLayout(dir, o.CoreDumpPatterns)
	if err != nil {
		add("", fmt.Sprintf("the VM's text files cannot be read as a layout: %v", err), nil)
		return out, 0
	}
	if st, err := vm.ReadVMStatus(dir, o.CoreDumpPatterns); err == nil {
		for _, p := range st.Problems {
			add("", p, nil)
		}
	}
	dekOf := func(ks string, b keys.Binding) (*keys.DEK, error) {
		k := ks + "\x00" + string(b.Purpose) + "\x00" + b.OwnerID
		if d, ok := deks[k]; ok {
			return d, nil
		}
		d, _, err := o.unwrapFrom(ctx, ks, b)
		if err != nil {
			return nil, err
		}
		deks[k] = d
		return d, nil
	}
	checked := 0
	checkOne := func(name string, ks string, b keys.Binding, kind container.Kind, sizeHint int64) {
		path := filepath.Join(l.Dir, name)
		dek, err := dekOf(ks, b)
		if err != nil {
			add(name, fmt.Sprintf("cannot be verified: its key does not unwrap: %v", err), nil)
			return
		}
		problem, fix := checkContainer(path, dek, kind, b, sizeHint)
		checked++
		if problem != "" {
			add(name, problem, fix)
		}
	}
	for _, d := range l.Disks {
		name := d.Name
		switch {
		case d.KeySafe == "" && !d.Embedded:
			if _, _, ok := vm.ExtentCopies(l.Dir, d); ok && l.Encrypted {
				// vm status has reported it; the fix is RestoreDiskKeys.
				add(name, "lost its key lines; its extents carry a keySafe copy", func() (string, error) {
					id, err := o.RestoreDiskKeys(ctx, l.Dir, name)
					if err != nil {
						return "", err
					}
					return "key lines restored from the extents' keySafe copy (disk id " + id + ")", nil
				})
			}
			continue
		case d.DiskID == "":
			if !d.Embedded {
				add(name, "has encryptionKeys but no "+vm.DDBDiskID+" line", func() (string, error) {
					id, err := o.RestoreDiskKeys(ctx, l.Dir, name)
					if err != nil {
						return "", err
					}
					return "disk id line restored (" + id + ")", nil
				})
			}
			continue
		}
		hints := flatSizes(l.Dir, d)
		for _, e := range d.Extents {
			checkOne(e, d.KeySafe, keys.Binding{Purpose: keys.PurposeDisk, OwnerID: d.DiskID}, container.KindExtent, hints[e])
		}
	}
	if l.Encrypted {
		for _, f := range l.Files {
			checkOne(f.Name, l.KeySafe, keys.Binding{Purpose: keys.PurposeVM, OwnerID: l.VMID}, f.Kind, 0)
		}
	}
	return out, checked
}

// checkContainer is the per-file part of Check: a finding (or "") and,
// when a safe repair exists, the function that applies it.
func checkContainer(path string, dek *keys.DEK, kind container.Kind, owner keys.Binding, sizeHint int64) (string, func() (string, error)) {
	c, err := container.OpenContainerDegraded(path, dek, "")
	switch {
	case errors.Is(err, container.ErrNotContainer):
		return fmt.Sprintf("the VM's files say an encrypted %s belongs here, but this is not a vmcryptd container", kind), nil
	case errors.Is(err, container.ErrWrongKey):
		return "encrypted under a different key than the VM's files name", nil
	case errors.Is(err, container.ErrTampered):
		return "no header slot authenticates (tampered or corrupt); restore the file from a backup", nil
	case errors.Is(err, container.ErrTruncated):
		return fmt.Sprintf("truncated: %v", err), nil
	case errors.Is(err, os.ErrNotExist):
		return "missing", nil
	case err != nil:
		return fmt.Sprintf("cannot be opened: %v", err), nil
	}
	defer c.Close()
	h, health := c.Header(), c.Health()
	switch {
	case h.Kind != kind:
		return fmt.Sprintf("holds a %s container, its name says %s", h.Kind, kind), nil
	case h.Binding != owner:
		return fmt.Sprintf("its header binds it to %s %s, its VM's files to %s %s", h.Binding.Purpose, h.Binding.OwnerID, owner.Purpose, owner.OwnerID), nil
	case health.Degraded != "":
		return "degraded: " + health.Degraded + "; served read-only, conversions refuse it", func() (string, error) {
			return container.RepairHeader(path, dek, sizeHint)
		}
	case health.Interrupted:
		return "its two header slots differ (an interrupted header update, or a file from before mirrored slots): one more fault would lose the newer one", func() (string, error) {
			return container.RepairHeader(path, dek, sizeHint)
		}
	}
	return "", nil
}

// flatSizes returns, for a text descriptor's FLAT/VMFS extents, the
// logical size its extent line gives (offset + sectors, in bytes): the
// one size a repair may take from outside the container.
func flatSizes(dir string, d *vm.Disk) map[string]int64 {
	out := map[string]int64{}
	if d.Embedded {
		return out
	}
	raw, err := safeopen.ReadFile(filepath.Join(dir, d.Name), vm.MaxDescriptor)
	if err != nil {
		return out
	}
	desc, err := vmdk.ParseDescriptor(raw)
	if err != nil {
		return out
	}
	for _, e := range desc.Extents() {
		if e.Filename == "" || (e.Type != vmdk.ExtentFlat && e.Type != "VMFS") {
			continue
		}
		out[filepath.Base(e.Filename)] = (e.Offset + e.Sectors) * 512
	}
	return out
}

package vmops

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
)

// Checks a conversion runs before it changes anything (no journal, no
// temporary file): a conversion that would stop half way, or convert a
// file the wrong way, is refused with every file it cannot convert named
// (docs/FORMAT.md section 5.1).

// ConvertError is a conversion refused before it changed anything: every
// file it could not convert, one line each.
type ConvertError struct {
	Dir  string
	Op   vm.Op
	Errs []error
}

func (e *ConvertError) Error() string {
	lines := make([]string, len(e.Errs))
	for i, err := range e.Errs {
		lines[i] = err.Error()
	}
	sort.Strings(lines)
	if len(lines) == 1 { // the usual case: one line naming the file
		return fmt.Sprintf("%s refused, nothing changed: %s", e.Op, lines[0])
	}
	return fmt.Sprintf("%s: %s refused, nothing changed; %d files cannot be converted (one line each):\n%s", e.Dir, e.Op, len(lines), strings.Join(lines, "\n"))
}

func (e *ConvertError) Unwrap() []error { return e.Errs }

// convertErr is nil without problems.
func convertErr(dir string, op vm.Op, problems []error) error {
	if len(problems) == 0 {
		return nil
	}
	return &ConvertError{Dir: dir, Op: op, Errs: problems}
}

// precheckEncrypt refuses, before anything is written, a first
// encryption of a VM any of whose files is already a container (a
// descriptor or vmx that lost its key lines: encrypting it again would
// wrap ciphertext in a second container, and overwrite key lines), whose
// descriptors still name a key, or whose files cannot be converted
// (symlinks, hard links, other file types).
func (o *VMOps) precheckEncrypt(ctx context.Context, l *vm.Layout) error {
	var problems []error
	add := func(format string, a ...any) { problems = append(problems, fmt.Errorf(format, a...)) }
	addErr := func(err error) { problems = append(problems, err) }
	for _, d := range l.Disks {
		if d.KeySafe != "" {
			if d.Embedded {
				add("%s: already encrypted (its key is in its header), but the vmx has no %s line: restore the vmx's encryption lines from a backup", filepath.Join(l.Dir, d.Name), vm.VMXKeySafe)
			} else {
				add("%s: names a disk key (%s), but the vmx has no %s line: restore the vmx's encryption lines from a backup", filepath.Join(l.Dir, d.Name), vm.DescKeySafe, vm.VMXKeySafe)
			}
			continue
		}
		for _, e := range d.Extents {
			p := filepath.Join(l.Dir, e)
			if err := sourceProblem(p); err != nil {
				addErr(err)
				continue
			}
			if h, real := o.realContainer(ctx, p); real {
				add("%s: already encrypted (a container of disk %s); its key lines are missing: restore the vmx's encryption lines from a backup, then run `vmcryptd disk restore-keys %s %s`", p, h.Binding.OwnerID, l.Dir, d.Name)
			}
		}
	}
	for _, f := range l.Files {
		p := filepath.Join(l.Dir, f.Name)
		if err := sourceProblem(p); err != nil {
			addErr(err)
			continue
		}
		if h, ok := containerAt(p); ok {
			add("%s: already encrypted (a %s container of %s %s); the vmx lost its encryption lines: restore %s, %s and %s from a backup of the vmx", p, h.Kind, h.Binding.Purpose, h.Binding.OwnerID, vm.VMXKeySafe, vm.VMXVMID, vm.VMXData)
		}
	}
	for _, c := range l.CoreDumps {
		if err := sourceProblem(filepath.Join(l.Dir, c)); err != nil {
			addErr(err)
		}
	}
	// A VM-key file that is not a regular file (a symlink, a FIFO) is not
	// in the layout at all: encrypting the rest would leave it plain.
	named := map[string]bool{}
	for _, ref := range []string{l.VMX.NVRAM(), l.VMX.SwapDerivedName(), l.VMX.CheckpointVMState()} {
		if ref != "" {
			named[filepath.Base(ref)] = true
		}
	}
	ents, err := os.ReadDir(l.Dir)
	if err != nil {
		return fmt.Errorf("%s: %w", l.Dir, err)
	}
	for _, e := range ents {
		if n := e.Name(); !e.Type().IsRegular() && !e.IsDir() && (named[n] || vm.KindByName(n) != 0) {
			add("%s is not a regular file (%s); it would stay plain", filepath.Join(l.Dir, n), e.Type())
		}
	}
	return convertErr(l.Dir, vm.OpEncrypt, problems)
}

// realContainer reports whether the extent at p is, or may be, a real
// container: one whose header carries a keySafe copy that either opens
// it (an encrypted disk that lost its key lines) or cannot be checked
// (its KEK is not at hand, or it does not unwrap: when in doubt,
// refuse). A guest writes anything into its plain disk, so a header-like
// start without a copy, or whose copy's DEK does not authenticate the
// header, is guest data
// and is encrypted as such (no container is ever wrapped in another:
// its header would have authenticated).
func (o *VMOps) realContainer(ctx context.Context, p string) (*container.Header, bool) {
	head, err := vm.RegularHead(p)
	if err != nil {
		return nil, false
	}
	h, err := container.PeekHeader(head)
	if err != nil {
		return nil, false
	}
	ks, ok := container.ReadEmbeddedKeySafe(head)
	if !ok {
		return h, false
	}
	dek, _, err := o.unwrapFrom(ctx, ks, h.Binding)
	if err != nil {
		return h, true // a KEK not at hand, or a copy that does not open: refuse
	}
	defer dek.Destroy()
	state, _, err := container.KeyStateOf(p, dek)
	return h, err != nil || state == container.StateUnderKey
}

// sourceProblem is checkSource for a file that must exist.
func sourceProblem(p string) error {
	_, err := container.CheckSource(p)
	return err
}

// containerAt reports whether the regular file at p parses as a container.
func containerAt(p string) (*container.Header, bool) {
	head, err := vm.RegularHead(p)
	if err != nil {
		return nil, false
	}
	h, err := container.PeekHeader(head)
	return h, err == nil
}

// precheckConvert refuses, before anything is written, a decrypt or deep
// rekey that could not convert every container of the VM directory:
// every file the VM's text files say is encrypted must be a regular
// container under its key with the kind its name gives, every disk whose
// extents are containers must name its key, and no other container may
// lie in the directory (a disk made through a view and never attached, a
// copy): a decrypt that left one behind would make it unreadable (the VM
// key it is wrapped under goes with the vmx's lines). ts are the files to
// convert with their current keys.
func precheckConvert(l *vm.Layout, op vm.Op, ts []task) error {
	var problems []error
	add := func(format string, a ...any) { problems = append(problems, fmt.Errorf(format, a...)) }
	addErr := func(err error) { problems = append(problems, err) }
	covered := map[string]bool{vm.JournalName: true}
	for _, t := range ts {
		covered[filepath.Base(t.path)] = true
		if err := sourceProblem(t.path); err != nil {
			addErr(err)
			continue
		}
		head, err := vm.RegularHead(t.path)
		if err != nil {
			add("%s: %v", t.path, err)
			continue
		}
		if p := vm.PlaceProblem(l, filepath.Base(t.path), head); p != "" {
			add("%s: %s", t.path, p)
			continue
		}
		state, kind, err := container.KeyStateOf(t.path, t.dek)
		switch {
		case err != nil:
			addErr(err)
		case state == container.StatePlain:
			add("%s: not a valid container, but its VM's files say it is encrypted", t.path)
		case state == container.StateOtherKey:
			add("%s: encrypted with a key that is not this VM's or disk's", t.path)
		default:
			if err := checkKind(t, kind); err != nil {
				addErr(err)
				continue
			}
			// Opened as the conversion will open it: whatever the
			// container layer refuses to convert (a degraded header, a
			// truncated payload) is refused here, before the journal.
			c, err := container.OpenContainer(t.path, t.dek, true, "")
			if err != nil {
				addErr(fmt.Errorf("%s: %w", t.path, err))
				continue
			}
			c.Close()
		}
	}
	for _, d := range l.Disks {
		if d.KeySafe != "" {
			if d.DiskID == "" && !d.Embedded {
				add("%s: has %s but no %s line: run `vmcryptd disk restore-keys %s %s`", filepath.Join(l.Dir, d.Name), vm.DescKeySafe, vm.DDBDiskID, l.Dir, d.Name)
			}
			continue
		}
		for _, e := range d.Extents {
			covered[e] = true
			if h, ok := containerAt(filepath.Join(l.Dir, e)); ok {
				add("%s: an encrypted container (disk %s), but descriptor %s has no %s line: run `vmcryptd disk restore-keys %s %s` (or, if it is guest data, detach the disk)", filepath.Join(l.Dir, e), h.Binding.OwnerID, d.Name, vm.DescKeySafe, l.Dir, d.Name)
			}
		}
	}
	for _, c := range l.CoreDumps {
		covered[c] = true
	}
	ents, err := os.ReadDir(l.Dir)
	if err != nil {
		return fmt.Errorf("%s: %w", l.Dir, err)
	}
	for _, e := range ents {
		if covered[e.Name()] || !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(l.Dir, e.Name())
		if h, ok := containerAt(p); ok {
			what := "no vmx or descriptor names it"
			if vm.IsVMDKName(e.Name()) {
				what += " (a disk made through a view and not attached?)"
			}
			add("%s: a container of %s %s that %s would leave behind: %s; attach it (vmcryptd disk attach) or move it out of the VM directory", p, h.Binding.Purpose, h.Binding.OwnerID, op, what)
		}
	}
	return convertErr(l.Dir, op, problems)
}

// CheckEncrypt runs vm encrypt's checks on the plain VM in dir without
// changing anything, so a caller can refuse before it asks a key server
// for a new KEK.
func (o *VMOps) CheckEncrypt(ctx context.Context, dir string) error {
	l, err := vm.LoadLayout(dir, o.CoreDumpPatterns)
	if err != nil {
		return err
	}
	if l.Encrypted {
		return fmt.Errorf("%s: VM is already encrypted", dir)
	}
	return o.precheckEncrypt(ctx, l)
}

// layoutProblems lists, for an operation that changes key lines only
// (a shallow rekey), every file that breaks placeProblem's rule.
func layoutProblems(l *vm.Layout) []error {
	var out []error
	check := func(name string) {
		p := filepath.Join(l.Dir, name)
		head, err := vm.RegularHead(p)
		if err != nil {
			out = append(out, fmt.Errorf("%s: %w", p, err))
			return
		}
		if pr := vm.PlaceProblem(l, name, head); pr != "" {
			out = append(out, fmt.Errorf("%s: %s", p, pr))
		}
	}
	for _, d := range l.Disks {
		for _, e := range d.Extents {
			check(e)
		}
	}
	for _, f := range l.Files {
		check(f.Name)
	}
	return out
}

// precheckCoreDumps refuses, before a decrypt writes anything, core dumps
// it could not decrypt at its end (their host key cannot be had): the
// VM's files would be plain by then and the decrypt half done.
func (o *VMOps) precheckCoreDumps(ctx context.Context, l *vm.Layout) error {
	var problems []error
	for _, c := range l.CoreDumps {
		p := filepath.Join(l.Dir, c)
		head, err := vm.RegularHead(p)
		if err != nil {
			problems = append(problems, fmt.Errorf("%s: %w", p, err))
			continue
		}
		h, err := container.PeekHeader(head)
		if err != nil {
			continue // plain: nothing to decrypt
		}
		ks, ok := container.ReadEmbeddedKeySafe(head)
		if !ok || h.Binding.Purpose != keys.PurposeCoreDump {
			problems = append(problems, fmt.Errorf("%s: an encrypted core dump without its own key copy", p))
			continue
		}
		dek, _, err := o.unwrapFrom(ctx, ks, h.Binding)
		if err != nil {
			problems = append(problems, fmt.Errorf("%s: core dump key: %w", p, err))
			continue
		}
		dek.Destroy()
	}
	return convertErr(l.Dir, vm.OpDecrypt, problems)
}

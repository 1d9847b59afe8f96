package vm

import (
	"errors"
	"fmt"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/formats/vmdir"
)

// The trust decision of docs/FORMAT.md section 5: may a file be served
// decrypted, and under which key? Decide is the only place that
// answers it. It does no I/O: the caller (Datastore.roleOf) gathers the
// facts about one file, the expensive ones behind functions that
// Decide calls only where a clause needs them. Classify, Open,
// Settle and WouldEncrypt all go through roleOf, so they cannot disagree;
// TestTrustRule has one row per clause.

// Clause names the FORMAT.md section 5 clause a verdict comes from. It is
// carried by refusals (RefusedError), logs, audit lines and metrics, so
// "refused by the layout" is never mistaken for "key not in memory".
type Clause string

const (
	// The file does not start like a container and its place does not
	// say it is encrypted: plain data.
	ClauseNotContainer Clause = "not-a-container"
	// An extent of a disk whose descriptor has encryptionKeys, in an
	// encrypted VM: that keySafe, the disk's id.
	ClauseEncryptedExtent Clause = "encrypted-extent"
	// An extent of a disk whose descriptor has no encryptionKeys: plain.
	ClausePlainExtent Clause = "plain-extent"
	// An extent of a disk without encryptionKeys whose extents are all
	// containers of one disk: the descriptor lost its key lines; refused.
	ClauseLostKeyLines Clause = "lost-key-lines"
	// A descriptor with encryptionKeys but no disk id: refused.
	ClauseDiskWithoutID Clause = "disk-without-id"
	// An extent of an encrypted disk in a plain VM: refused.
	ClauseEncryptedDiskPlainVM Clause = "encrypted-disk-in-plain-vm"
	// A VM-key file of an encrypted VM: the vmx's keySafe, the VM's id,
	// the kind its reference gives.
	ClauseVMKeyFile Clause = "vm-key-file"
	// A VM-key file of a plain VM: plain.
	ClausePlainVMFile Clause = "vm-key-file-of-plain-vm"
	// A core dump by name: its header copy, purpose coredump.
	ClauseCoreDump Clause = "core-dump"
	// A .vmdk of an encrypted VM that this view made: its header copy.
	ClauseViewMadeDisk Clause = "view-made-disk"
	// A .vmdk of an encrypted VM named by one text descriptor beside it:
	// as that descriptor's extent.
	ClauseDescribedDisk Clause = "described-disk"
	// A .vmdk of an encrypted VM that nothing names (or two descriptors
	// name): refused until attached.
	ClauseUnattachedDisk Clause = "unattached-disk"
	// Anything else: plain data, whatever its bytes are.
	ClauseAnythingElse Clause = "anything-else"
	// A file with several names that would open with its header copy:
	// refused.
	ClauseHardLinks Clause = "hard-links"
	// A VM directory whose text files cannot be read: refused (a file
	// that does not start like a container stays plain).
	ClauseUnreadableVM Clause = "unreadable-vm"
	// A directory without a vmx: only core dumps are containers.
	ClauseNoVMX Clause = "no-vmx"
	// Where the text files say a file is encrypted, anything but a
	// container; or a VM-key container where the vmx lost its lines.
	ClauseNoSilentDowngrade Clause = "no-silent-downgrade"
	// A verified header's kind must fit the name.
	ClauseKind Clause = "kind"
)

// allClauses lists every clause (TestTrustRule checks each has a row and
// a mention in FORMAT.md section 5).
var allClauses = []Clause{
	ClauseNotContainer, ClauseEncryptedExtent, ClausePlainExtent, ClauseLostKeyLines,
	ClauseDiskWithoutID, ClauseEncryptedDiskPlainVM, ClauseVMKeyFile, ClausePlainVMFile,
	ClauseCoreDump, ClauseViewMadeDisk, ClauseDescribedDisk, ClauseUnattachedDisk,
	ClauseAnythingElse, ClauseHardLinks, ClauseUnreadableVM, ClauseNoVMX,
	ClauseNoSilentDowngrade, ClauseKind,
}

// verdict is what the trust decision says about a file.
type verdict int

const (
	verdictContainer verdict = iota // serve it decrypted
	VerdictPlain                    // its bytes are data, whatever they look like
	VerdictSuspect                  // neither: refuse it
)

// role is how a file may be served, and with which key.
type Role struct {
	Verdict verdict
	clause  Clause
	why     string // for verdictSuspect
	// ks is the keySafe that must hold the file's DEK, and owner the
	// binding its header must carry. ks == "": the file's own header
	// copy, for files no text file names a key for (core dumps, .vmdk
	// files made through a view before a descriptor names them), with
	// purpose the purpose its binding must have.
	KeySafe string
	Owner   keys.Binding
	Purpose keys.Purpose
	// kind is the kind its header must have; set for every container
	// verdict (the name's kind: by the VM's text files, or by name).
	Kind container.Kind
}

func suspect(c Clause, format string, a ...any) Role {
	return Role{Verdict: VerdictSuspect, clause: c, why: fmt.Sprintf(format, a...)}
}

func plain(c Clause) Role { return Role{Verdict: VerdictPlain, clause: c} }

// Facts is what Decide may know about one file. The func fields
// do I/O on the caller's side; Decide calls each only where a
// clause needs it (a table test supplies canned answers).
type Facts struct {
	Name string // base name
	Head []byte // the file's first HeaderSize bytes (fewer if shorter)
	// Layout is the VM directory's model; LayoutErr why it could not be
	// read (then Layout is nil).
	Layout    *Layout
	LayoutErr error
	// CorePatterns are the configured extra core-dump name patterns.
	CorePatterns []string

	// NoVMX reports whether the directory has no vmx at all (asked only
	// when LayoutErr is set).
	NoVMX func() bool
	// Nlink is the file's link count (asked for header-copy verdicts).
	Nlink func() (uint64, error)
	// MadeByView reports whether this view created the file with the
	// given file id (same inode).
	MadeByView func(fileID [16]byte) bool
	// DescribedBy finds the one text descriptor beside the file that
	// names it (found false: none; err: two, or the directory failed).
	DescribedBy func() (dk *Disk, found bool, err error)
	// ExtentCopies reports whether every extent of dk is a container of
	// one disk carrying the same keySafe copy, and that disk's binding.
	ExtentCopies func(dk *Disk) (keys.Binding, bool)
}

// Decide is the FORMAT.md section 5 decision for one file.
func Decide(f Facts) Role {
	r := placeTrust(f)
	if r.Verdict == verdictContainer && r.KeySafe == "" {
		// A file with several names is judged by whichever one a view
		// looked up last: a hard link named like a core dump to a
		// guest's flat extent must not make that extent open with its
		// header copy. (Keys the text files name are checked against
		// the header's binding, so links do not matter there.)
		n, err := f.Nlink()
		if err != nil {
			return suspect(ClauseHardLinks, "%v", err)
		}
		if n > 1 {
			return suspect(ClauseHardLinks, "it has %d names (hard links); a container opened with its own key copy must have one", n)
		}
	}
	return r
}

// placeTrust is Decide before the hard-link clause.
func placeTrust(f Facts) Role {
	name, l := f.Name, f.Layout
	h, perr := container.PeekHeader(f.Head)
	isContainer := perr == nil
	if f.LayoutErr != nil {
		switch {
		case !isContainer:
			return plain(ClauseNotContainer) // as before its VM's files broke
		case !f.NoVMX():
			return suspect(ClauseUnreadableVM, "its VM's files cannot be read: %v", f.LayoutErr)
		case vmdir.IsCoreDumpName(name) || matchAny(f.CorePatterns, name):
			return Role{Verdict: verdictContainer, clause: ClauseCoreDump, Purpose: keys.PurposeCoreDump, Kind: container.KindCoreDump}
		}
		return plain(ClauseNoVMX)
	}
	if p := PlaceProblem(l, name, f.Head); p != "" {
		c := ClauseNoSilentDowngrade
		if dk := extentOf(l, name); dk != nil && dk.KeySafe != "" && !l.Encrypted {
			c = ClauseEncryptedDiskPlainVM
		}
		return suspect(c, "%s", p)
	}
	if !isContainer {
		return plain(ClauseNotContainer)
	}
	if dk := extentOf(l, name); dk != nil {
		return extentTrust(f, dk) // (an encrypted disk in a plain VM is a placeProblem)
	}
	// The kind is the one the vmx's reference gives (checkpoint.vmState
	// naming a .vmsn is a vmsn), as the conversions write it.
	if k := fileKindIn(l, name); k != 0 {
		if !l.Encrypted {
			return plain(ClausePlainVMFile)
		}
		return Role{Verdict: verdictContainer, clause: ClauseVMKeyFile, KeySafe: l.KeySafe, Owner: keys.Binding{Purpose: keys.PurposeVM, OwnerID: l.VMID}, Kind: k}
	}
	for _, c := range l.CoreDumps {
		if c == name {
			return Role{Verdict: verdictContainer, clause: ClauseCoreDump, Purpose: keys.PurposeCoreDump, Kind: container.KindCoreDump}
		}
	}
	if l.Encrypted && IsVMDKName(name) {
		// A .vmdk of an encrypted VM that no disk of its vmx names: a
		// disk detached (whose files a guest wrote) or made through a
		// view and not attached yet.
		if f.MadeByView(h.FileID) {
			return Role{Verdict: verdictContainer, clause: ClauseViewMadeDisk, Purpose: keys.PurposeDisk, Kind: container.KindExtent}
		}
		dk, found, err := f.DescribedBy()
		switch {
		case err != nil:
			return suspect(ClauseUnattachedDisk, "%v", err)
		case !found:
			return suspect(ClauseUnattachedDisk, "no vmx or descriptor names it and this view did not make it; attach it (vmcryptd disk attach) to open it")
		}
		r := extentTrust(f, dk)
		if r.clause == ClauseEncryptedExtent {
			r.clause = ClauseDescribedDisk
		}
		return r
	}
	return plain(ClauseAnythingElse)
}

// extentOf is the disk of l that has name as an extent, or nil.
func extentOf(l *Layout, name string) *Disk {
	for _, dk := range l.Disks {
		if slicesContains(dk.Extents, name) {
			return dk
		}
	}
	return nil
}

// extentTrust is how an extent of the text-descriptor disk dk is served:
// under the key its descriptor names, bound to its disk id; as plain data
// when the descriptor names no key; refused when it names no key but the
// extents look like containers of one disk (lost key lines, or guest
// data), or names a key without the disk id.
func extentTrust(f Facts, dk *Disk) Role {
	switch {
	case dk.KeySafe == "":
		if b, ok := f.ExtentCopies(dk); ok {
			return suspect(ClauseLostKeyLines, "disk %s has no encryptionKeys line, but its extents are containers of disk %s (see vmcryptd vm status)", dk.Name, b.OwnerID)
		}
		return plain(ClausePlainExtent)
	case dk.DiskID == "":
		return suspect(ClauseDiskWithoutID, "disk %s has encryptionKeys but no %s line (see vmcryptd vm status)", dk.Name, DDBDiskID)
	}
	return Role{Verdict: verdictContainer, clause: ClauseEncryptedExtent, KeySafe: dk.KeySafe, Owner: keys.Binding{Purpose: keys.PurposeDisk, OwnerID: dk.DiskID}, Kind: container.KindExtent}
}

// KindFits is the last clause of section 5: the authenticated kind of a
// container must be the one its place requires. Files of one VM share a
// key, so without it a swap file renamed over the nvram would be served
// as the nvram.
func KindFits(path string, r Role, got container.Kind) error {
	if r.Kind != 0 && got != r.Kind {
		return &RefusedError{Path: path, Clause: ClauseKind, Why: fmt.Sprintf("holds a %s container, its name says %s", got, r.Kind)}
	}
	return nil
}

// ErrRefused is matched (errors.Is) by every refusal of the trust
// decision; the view answers it with EACCES.
var ErrRefused = errors.New("refused by its VM's files")

// RefusedError is a file the trust decision refuses: the clause and why.
type RefusedError struct {
	Path   string
	Clause Clause
	Why    string
}

func (e *RefusedError) Error() string {
	if e.Path == "" {
		return fmt.Sprintf("refused (%s): %s", e.Clause, e.Why)
	}
	return fmt.Sprintf("%s: refused (%s): %s", e.Path, e.Clause, e.Why)
}

// Is makes a refusal match ErrRefused, and a kind refusal ErrKindMismatch
// (its older name, kept for callers that test it).
func (e *RefusedError) Is(target error) bool {
	return target == ErrRefused || (target == container.ErrKindMismatch && e.Clause == ClauseKind)
}

// refusal returns r's refusal for path (r.v == verdictSuspect).
func (r Role) Refusal(path string) *RefusedError {
	return &RefusedError{Path: path, Clause: r.clause, Why: r.why}
}

// PlaceProblem is the rule of FORMAT.md section 5 for what the file
// name of the VM directory of l must start with, given the VM's text
// files: "" when the file's first bytes (head) fit what they say. It is
// one decision, used by the view (roleOf: a problem is refused), by vm
// status (a problem line) and by the conversions (they stop on it):
//
//   - an extent of a disk whose descriptor names a key (encryptionKeys),
//     in an encrypted VM, must be a container: a plain file, one whose
//     two header slots are both damaged, or an empty file in its place
//     is a problem, never plain data (no silent downgrade);
//   - a VM-key file (nvram, vswp, vmsn, vmss, vmem, by the vmx's name or
//     its extension) of an encrypted VM must be a container;
//   - in a VM whose vmx has no encryption.keySafe, a VM-key file that is a
//     container bound to a VM key, and an extent of a disk that names a
//     key, are problems: the vmx lost its key lines, and serving the raw
//     container or encrypting it again would hide that;
//   - anything else is not judged here (roleOf decides from the header).
func PlaceProblem(l *Layout, name string, head []byte) string {
	h, perr := container.PeekHeader(head)
	isC := perr == nil
	for _, dk := range l.Disks {
		if !slicesContains(dk.Extents, name) {
			continue
		}
		if !l.Encrypted && dk.KeySafe != "" {
			return fmt.Sprintf("disk %s is encrypted, but the vmx has no %s line: the vmx lost its encryption lines (restore %s, %s and %s from a backup of the vmx)", dk.Name, VMXKeySafe, VMXKeySafe, VMXVMID, VMXData)
		}
		if dk.Embedded {
			return ""
		}
		if l.Encrypted && dk.KeySafe != "" && !isC {
			return fmt.Sprintf("not a valid container (%s), but descriptor %s names its key: a plain or damaged file where encrypted data belongs; restore it from a backup", notContainerWhy(head), dk.Name)
		}
		return ""
	}
	if fileKindIn(l, name) == 0 {
		return ""
	}
	switch {
	case l.Encrypted && !isC:
		return fmt.Sprintf("not a valid container (%s), but its VM is encrypted: a plain or damaged file where encrypted data belongs; restore it from a backup, or move it out of the VM directory", notContainerWhy(head))
	case !l.Encrypted && isC && h.Binding.Purpose == keys.PurposeVM:
		return fmt.Sprintf("a container of VM %s, but the vmx has no %s line: the vmx lost its encryption lines (restore %s, %s and %s from a backup of the vmx)", h.Binding.OwnerID, VMXKeySafe, VMXKeySafe, VMXVMID, VMXData)
	}
	return ""
}

func notContainerWhy(head []byte) string {
	if len(head) == 0 {
		return "empty file"
	}
	return "no valid header slot"
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// fileKindIn is the container kind of a VM-key file of l: the kind the
// vmx's reference gives it (checkpoint.vmState naming a .vmsn is a
// vmsn), 0 if name is not one.
func fileKindIn(l *Layout, name string) container.Kind {
	for _, f := range l.Files {
		if f.Name == name {
			return f.Kind
		}
	}
	return 0
}

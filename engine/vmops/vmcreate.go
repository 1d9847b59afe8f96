package vmops

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/nvram"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// Subformats vmcryptd can create. monolithicFlat is written natively; the
// others are made by qemu-img, which must then be installed.
var Subformats = []string{"monolithicFlat", "monolithicSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"}

// DiskSpec is one disk of a new VM.
type DiskSpec struct {
	Size      int64
	Subformat string // "" means monolithicFlat
}

// CreateSpec describes a new VM.
type CreateSpec struct {
	Name    string
	Memory  int64 // bytes
	Disks   []DiskSpec
	Encrypt bool
	KEK     keys.KeyRef // used when Encrypt
}

// Limits on what Create and AddDisk accept, as vSphere documents them: a
// VM has at most 24 TiB of memory, a virtual disk at most 62 TiB.
const (
	MinMemory   = 4 << 20  // bytes
	MaxMemory   = 24 << 40 // bytes
	MaxDiskSize = 62 << 40 // bytes
)

// CheckMemory validates a new VM's memory size: 0 means the default
// (1 GiB); otherwise a whole number of MiB from 4 MiB to 24 TiB.
func CheckMemory(n int64) error {
	switch {
	case n == 0:
		return nil
	case n < 0:
		return fmt.Errorf("memory %d: must be positive", n)
	case n < MinMemory || n > MaxMemory:
		return fmt.Errorf("memory %d bytes: must be between 4 MiB and 24 TiB", n)
	case n%(1<<20) != 0:
		return fmt.Errorf("memory %d bytes: must be a whole number of MiB", n)
	}
	return nil
}

// CheckDiskSize validates a new disk's size: a positive multiple of 512
// Bytes, at most 62 TiB.
func CheckDiskSize(n int64) error {
	switch {
	case n <= 0:
		return fmt.Errorf("size %d: must be positive", n)
	case n > MaxDiskSize:
		return fmt.Errorf("size %d bytes: larger than the 62 TiB a virtual disk may have", n)
	case n%512 != 0:
		return fmt.Errorf("size %d bytes: must be a multiple of 512 bytes", n)
	}
	return nil
}

var safeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9 ._-]{0,79}$`)

// Create makes a new VM directory: vmx, nvram and disks. It is built in a
// staging directory beside dir and renamed into place when complete (and,
// with Encrypt, already encrypted), so dir never exists half-made and
// never holds plaintext. The staging copy only ever holds generated
// content: an empty nvram variable store and all-hole disks.
func (o *VMOps) Create(ctx context.Context, dir string, spec CreateSpec) error {
	if !safeName.MatchString(spec.Name) {
		return fmt.Errorf("VM name %q: use letters, digits, space, '.', '_' or '-' (max 80)", spec.Name)
	}
	if err := CheckMemory(spec.Memory); err != nil {
		return err
	}
	for i, d := range spec.Disks {
		if err := CheckDiskSize(d.Size); err != nil {
			return fmt.Errorf("disk %d: %w", i, err)
		}
	}
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("%s already exists", dir)
	}
	staging, err := os.MkdirTemp(filepath.Dir(dir), "."+filepath.Base(dir)+".vmcryptd-creating-")
	if err != nil {
		return err
	}
	if err := os.Chmod(staging, 0o755); err != nil {
		os.RemoveAll(staging)
		return err
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(staging)
		}
	}()
	nv, err := nvram.New(0, nil)
	if err != nil {
		return err
	}
	// Files of an encrypted VM are 0600; they are made by this process
	// in the directory it made, so they have its owner and group.
	perm := os.FileMode(0o644)
	if spec.Encrypt {
		perm = vm.EncryptedFilePerm(perm)
	}
	if err := os.WriteFile(filepath.Join(staging, spec.Name+".nvram"), nv, perm); err != nil {
		return err
	}
	var b strings.Builder
	uuid, err := biosUUID()
	if err != nil {
		return err
	}
	mem := spec.Memory
	if mem == 0 {
		mem = 1 << 30
	}
	fmt.Fprintf(&b, ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\n")
	fmt.Fprintf(&b, "displayName = %q\nguestOS = \"other-64\"\nfirmware = \"efi\"\nmemSize = \"%d\"\nnumvcpus = \"1\"\n", spec.Name, mem>>20)
	fmt.Fprintf(&b, "nvram = \"%s.nvram\"\nuuid.bios = \"%s\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\n", spec.Name, uuid)
	for i, d := range spec.Disks {
		name := diskFileName(spec.Name, i)
		if err := makeDisk(ctx, staging, name, d); err != nil {
			return err
		}
		if spec.Encrypt {
			if err := restrictDiskFiles(staging, name); err != nil {
				return err
			}
		}
		fmt.Fprintf(&b, "scsi0:%d.present = \"TRUE\"\nscsi0:%d.fileName = \"%s\"\nscsi0:%d.deviceType = \"scsi-hardDisk\"\n", i, i, name, i)
	}
	if err := os.WriteFile(filepath.Join(staging, spec.Name+".vmx"), []byte(b.String()), perm); err != nil {
		return err
	}
	if spec.Encrypt {
		if err := o.Encrypt(ctx, staging, spec.KEK); err != nil {
			return err
		}
	}
	if err := atomicfile.SyncDir(staging); err != nil {
		return err
	}
	if err := os.Rename(staging, dir); err != nil {
		return err
	}
	ok = true
	return atomicfile.SyncDir(filepath.Dir(dir))
}

// restrictDiskFiles gives the descriptor and extents of a disk just made
// in dir (by makeDisk: ours or qemu-img's, which makes them 0644) the
// permission of an encrypted VM's files, before they are encrypted (the
// containers keep the mode of the file they replace).
func restrictDiskFiles(dir, name string) error {
	d, _, err := vm.LoadDisk(dir, name)
	if err != nil {
		return err
	}
	for _, f := range append([]string{name}, d.Extents...) {
		p := filepath.Join(dir, f)
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		if err := os.Chmod(p, vm.EncryptedFilePerm(st.Mode().Perm())); err != nil {
			return err
		}
	}
	return nil
}

func diskFileName(vm string, i int) string {
	if i == 0 {
		return vm + ".vmdk"
	}
	return fmt.Sprintf("%s_%d.vmdk", vm, i)
}

// biosUUID returns a uuid.bios value in VMware's "56 4d ... -..." form.
func biosUUID() (string, error) {
	var u [16]byte
	if _, err := rand.Read(u[:]); err != nil {
		return "", err
	}
	var parts []string
	for i, x := range u {
		s := fmt.Sprintf("%02x", x)
		if i == 8 {
			s = "-" + s
		}
		parts = append(parts, s)
	}
	return strings.Replace(strings.Join(parts, " "), " -", "-", 1), nil
}

// makeDisk creates a disk of the given subformat in dir.
func makeDisk(ctx context.Context, dir, name string, d DiskSpec) error {
	if err := CheckDiskSize(d.Size); err != nil {
		return fmt.Errorf("disk %s: %w", name, err)
	}
	sf := d.Subformat
	if sf == "" {
		sf = "monolithicFlat"
	}
	if sf == "monolithicFlat" {
		return MakeFlatDisk(dir, name, d.Size)
	}
	known := false
	for _, s := range Subformats {
		known = known || s == sf
	}
	if !known {
		return fmt.Errorf("disk %s: unknown subformat %q (known: %s)", name, sf, strings.Join(Subformats, ", "))
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return fmt.Errorf("disk %s: subformat %s is created with qemu-img, which is not installed (apt-get install qemu-utils)", name, sf)
	}
	cmd := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sf, name, strconv.FormatInt(d.Size, 10))
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("disk %s: qemu-img create: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// MakeFlatDisk writes a monolithicFlat descriptor and a sparse flat extent.
func MakeFlatDisk(dir, name string, size int64) error {
	extent := strings.TrimSuffix(name, ".vmdk") + "-flat.vmdk"
	var cid [4]byte
	rand.Read(cid[:])
	desc, err := vmdk.NewFlatDescriptor(extent, size, binary.BigEndian.Uint32(cid[:]))
	if err != nil {
		return fmt.Errorf("disk %s: %w", name, err)
	}
	f, err := os.OpenFile(filepath.Join(dir, extent), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name), desc, 0o644)
}

// AddDisk creates a new disk in an existing VM and attaches it at the
// next free scsi0 slot. On an encrypted VM the disk gets its own DEK,
// wrapped under the VM's KEK, before the vmx names it.
func (o *VMOps) AddDisk(ctx context.Context, dir string, d DiskSpec) (string, error) {
	l, err := settledLayout(dir, o.CoreDumpPatterns)
	if err != nil {
		return "", err
	}
	base := strings.TrimSuffix(filepath.Base(l.VMXPath), filepath.Ext(l.VMXPath))
	name := ""
	for i := 0; ; i++ {
		n := diskFileName(base, i)
		if _, err := os.Lstat(filepath.Join(dir, n)); errors.Is(err, os.ErrNotExist) {
			if _, err := os.Lstat(filepath.Join(dir, strings.TrimSuffix(n, ".vmdk")+"-flat.vmdk")); errors.Is(err, os.ErrNotExist) {
				name = n
				break
			}
		}
	}
	if err := makeDisk(ctx, dir, name, d); err != nil {
		return "", err
	}
	if l.Encrypted {
		if err := o.encryptNewDisk(ctx, l, name); err != nil {
			removeDiskFiles(dir, name)
			return "", err
		}
	}
	if err := attachToVMX(l, name); err != nil {
		return "", err
	}
	return name, nil
}

func removeDiskFiles(dir, name string) {
	if d, _, err := vm.LoadDisk(dir, name); err == nil {
		for _, e := range d.Extents {
			os.Remove(filepath.Join(dir, e))
		}
	}
	os.Remove(filepath.Join(dir, name))
}

// encryptNewDisk gives a freshly made disk its DEK under the VM's KEK.
func (o *VMOps) encryptNewDisk(ctx context.Context, l *vm.Layout, name string) error {
	entries, err := keys.DecodeKeySafe(l.KeySafe)
	if err != nil {
		return err
	}
	kekRef := entries[0].KEK
	d, _, err := vm.LoadDisk(l.Dir, name)
	if err != nil {
		return err
	}
	dek, b, ks, err := o.newBoundKey(ctx, kekRef, keys.PurposeDisk)
	if err != nil {
		return err
	}
	defer dek.Destroy()
	for _, e := range d.Extents {
		opts := container.CreateOptions{Kind: container.KindExtent, Binding: b, Impl: o.Impl, EmbeddedKeySafe: ks}
		if err := container.EncryptFile(ctx, filepath.Join(l.Dir, e), dek, opts, nil); err != nil {
			return err
		}
	}
	l.Disks = append(l.Disks, d)
	return o.writeDescriptors(l, []vm.JournalDisk{{Name: name, DiskID: b.OwnerID, KeySafe: ks}}, true, vm.WriteText)
}

// ErrEncryptedDiskOnPlainVM is vSphere's rule, with its wording.
var ErrEncryptedDiskOnPlainVM = errors.New("encrypted disks cannot be added to an unencrypted VM")

// ErrAttachEncrypted is returned by AttachDisk when the caller may not
// attach a disk to an encrypted VM: an encrypted disk puts a key into
// the VM, a plain one weakens its protection; both are cryptographic
// operations (vSphere's Cryptographer.AddDisk).
var ErrAttachEncrypted = errors.New("attaching a disk to an encrypted VM is a cryptographic operation")

// AttachDisk adds an existing disk (inside the VM directory) to the vmx.
// An encrypted disk is refused on a plain VM. Any disk attached to an
// encrypted VM needs mayCrypto (Cryptographer.AddDisk): an encrypted
// one puts a key into the VM, and a plain one puts guest data of an
// encrypted VM on disk in plaintext; the plain disk stays plain and vm
// status reports it.
func (o *VMOps) AttachDisk(ctx context.Context, dir, path string, mayCrypto bool) (encrypted bool, err error) {
	l, err := settledLayout(dir, o.CoreDumpPatterns)
	if err != nil {
		return false, err
	}
	p, err := vmdk.ResolveExtentPath(l.Dir, path)
	if err != nil || filepath.Dir(p) != l.Dir {
		return false, fmt.Errorf("%s: the disk must be a file inside the VM directory %s", path, l.Dir)
	}
	name := filepath.Base(p)
	for _, d := range l.Disks {
		if d.Name == name {
			return false, fmt.Errorf("%s is already attached", name)
		}
	}
	d, _, err := vm.LoadDisk(l.Dir, name)
	if err != nil {
		return false, err
	}
	encrypted = d.KeySafe != ""
	if !encrypted {
		// A container extent without a keySafe line would be unreadable.
		for _, e := range d.Extents {
			if st, err := keyStateOfAny(filepath.Join(l.Dir, e)); err == nil && st {
				encrypted = true
			}
		}
	}
	if encrypted && !l.Encrypted {
		return true, fmt.Errorf("%s: %w", name, ErrEncryptedDiskOnPlainVM)
	}
	if l.Encrypted && !mayCrypto {
		if !encrypted {
			return false, fmt.Errorf("%s: %w (a plain disk in an encrypted VM keeps guest data in plaintext)", name, ErrAttachEncrypted)
		}
		return true, fmt.Errorf("%s: %w", name, ErrAttachEncrypted)
	}
	return encrypted, attachToVMX(l, name)
}

// sharesKEK reports whether keySafes a and b name a common KEK.
func sharesKEK(a, b string) bool {
	ea, err := keys.DecodeKeySafe(a)
	if err != nil {
		return false
	}
	eb, err := keys.DecodeKeySafe(b)
	if err != nil {
		return false
	}
	for _, x := range ea {
		for _, y := range eb {
			if x.KEK == y.KEK {
				return true
			}
		}
	}
	return false
}

// keyStateOfAny reports whether path is a vmcryptd container (any key).
func keyStateOfAny(path string) (bool, error) {
	f, err := safeopen.Open(path, os.O_RDONLY)
	if err != nil {
		return false, err
	}
	defer f.Close()
	region := make([]byte, 2*container.SlotSize)
	n, _ := f.ReadAt(region, 0)
	_, err = container.PeekHeader(region[:n])
	return err == nil, nil
}

// attachToVMX names the disk at the first free scsi0:N slot.
func attachToVMX(l *vm.Layout, name string) error {
	used := map[string]bool{}
	for _, d := range l.VMX.Disks() {
		used[d.Device] = true
	}
	slot := -1
	for i := 0; i < 64; i++ {
		if i != 7 && !used[fmt.Sprintf("scsi0:%d", i)] { // 7 is the controller
			slot = i
			break
		}
	}
	if slot < 0 {
		return errors.New("no free scsi0 slot")
	}
	dev := fmt.Sprintf("scsi0:%d", slot)
	cfg := l.VMX
	for _, kv := range [][2]string{{dev + ".present", "TRUE"}, {dev + ".fileName", name}, {dev + ".deviceType", "scsi-hardDisk"}} {
		if err := cfg.Set(kv[0], kv[1]); err != nil {
			return err
		}
	}
	return vm.WriteText(l.VMXPath, cfg.Bytes())
}

// RestoreDiskKeys writes back the key lines (encryptionKeys and
// ddb.vmcryptd.diskId) of a disk of the encrypted VM in dir whose text
// descriptor lost them (an editor, qemu-img create over it), taking them
// from the keySafe copy its extents carry (FORMAT.md 3.4). It is an
// explicit act of an administrator with crypto rights and never
// automatic: a guest can write another disk's container, copy included,
// into its own plain disk, and only a person knows which of the two
// happened. Every extent must be a container of one disk holding the
// same copy, the copy must unwrap under a KEK the host has, and every
// extent's header must authenticate under that DEK.
//
// The copy must also be wrapped by a KEK the VM itself uses: another VM's
// disk under another key is never adopted. It returns the disk id whose
// key it wrote, for the administrator to check.
func (o *VMOps) RestoreDiskKeys(ctx context.Context, dir, path string) (string, error) {
	l, err := settledLayout(dir, o.CoreDumpPatterns)
	if err != nil {
		return "", err
	}
	p, err := vmdk.ResolveExtentPath(l.Dir, path)
	if err != nil || filepath.Dir(p) != l.Dir {
		return "", fmt.Errorf("%s: the disk must be a file inside the VM directory %s", path, l.Dir)
	}
	name := filepath.Base(p)
	var d *vm.Disk
	for _, x := range l.Disks {
		if x.Name == name {
			d = x
		}
	}
	switch {
	case d == nil:
		return "", fmt.Errorf("%s: not a disk of the VM in %s (attach it first)", name, l.Dir)
	case !l.Encrypted:
		return "", fmt.Errorf("%s: %w", name, ErrEncryptedDiskOnPlainVM)
	case d.Embedded:
		return "", fmt.Errorf("%s: its key is in its own header; nothing to restore", name)
	case d.KeySafe != "" && d.DiskID != "":
		return "", fmt.Errorf("%s: its descriptor has both key lines", name)
	}
	b, ks, ok := vm.ExtentCopies(l.Dir, d)
	if !ok {
		return "", fmt.Errorf("%s: its extents are not all containers of one disk carrying the same keySafe copy; nothing to restore from", name)
	}
	if d.KeySafe != "" && d.KeySafe != ks {
		// Only the disk id line is missing: the copy must be the same
		// keySafe (a shallow rekey rewrites both).
		return "", fmt.Errorf("%s: its encryptionKeys line and its extents' copy differ; restore it from a backup", name)
	}
	for _, x := range l.Disks {
		if x != d && x.DiskID == b.OwnerID {
			return "", fmt.Errorf("%s: its extents belong to disk %s, which is %s", name, b.OwnerID, x.Name)
		}
	}
	if d.DiskID != "" && d.DiskID != b.OwnerID {
		return "", fmt.Errorf("%s: its descriptor names disk %s, its extents disk %s", name, d.DiskID, b.OwnerID)
	}
	if !sharesKEK(ks, l.KeySafe) {
		return "", fmt.Errorf("%s: the extents' key is not wrapped by a KEK of this VM; not adopted", name)
	}
	dek, _, err := o.unwrapFrom(ctx, ks, b)
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	defer dek.Destroy()
	for _, e := range d.Extents {
		state, kind, err := container.KeyStateOf(filepath.Join(l.Dir, e), dek)
		if err != nil {
			return "", err
		}
		if state != container.StateUnderKey || kind != container.KindExtent {
			return "", fmt.Errorf("%s: extent %s does not authenticate as an extent under the key of its copy", name, e)
		}
	}
	return b.OwnerID, EditDescriptor(p, func(desc *vmdk.Descriptor) error { return vm.SetKeyLines(desc, ks, b.OwnerID) })
}

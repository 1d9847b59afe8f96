package vm

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"

	"github.com/google/uuid"
	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/formats/vmdir"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// Lines vmcryptd adds to a VM's text files (docs/FORMAT.md section 4).
const (
	VMXVMID       = "vmcryptd.vmId"
	VMXPolicy     = "vmcryptd.policy"
	VMXKeySafe    = "encryption.keySafe"
	VMXData       = "encryption.data"
	DDBDiskID     = "ddb.vmcryptd.diskId"
	DescKeySafe   = "encryptionKeys"
	JournalName   = ".vmcryptd-journal.json"
	PolicyEncrypt = "VM Encryption Policy"
	PolicyDefault = "Datastore Default"
)

// disk is one virtual disk of a VM (one descriptor; a snapshot's delta
// disk is a disk of its own).
type Disk struct {
	Name     string   // descriptor file (for an embedded descriptor: the extent)
	Embedded bool     // the descriptor lives inside the (single) extent
	Extents  []string // base names
	DiskID   string   // from ddb.vmcryptd.diskId or the container header
	KeySafe  string   // "" when plain
}

// DataFile is a non-disk file that the VM key protects.
type DataFile struct {
	Name string
	Kind container.Kind
}

// Layout is what a VM directory holds, as far as encryption goes.
type Layout struct {
	Dir       string
	VMXPath   string
	VMXText   []byte
	VMX       *vmx.File
	Encrypted bool
	VMID      string
	KeySafe   string
	Policy    string
	Disks     []*Disk
	Files     []DataFile // nvram, vswp, vmsn, vmss, vmem
	CoreDumps []string
	Snapshots int
	// Sources are the text files the layout was read from (vmx, vmsd,
	// each disk's descriptor or embedded-descriptor extent).
	Sources []string
}

var KindFromDir = map[vmdir.Kind]container.Kind{
	vmdir.KindNVRAM: container.KindNVRAM, vmdir.KindVSwap: container.KindVSWP, vmdir.KindVMSN: container.KindVMSN,
	vmdir.KindVMSS: container.KindVMSS, vmdir.KindVMEM: container.KindVMEM,
}

func matchAny(patterns []string, name string) bool {
	for _, p := range patterns {
		if ok, _ := filepath.Match(p, name); ok {
			return true
		}
	}
	return false
}

// LoadLayout reads a VM directory: the vmx, every disk the vmx or the
// snapshot descriptor names (following parent links), and the VM's data
// files. It works on plain and on encrypted VMs: an encrypted extent that
// holds its own descriptor is recognised by its container header.
// corePatterns adds core-dump file-name patterns to the built-in *.zdump,
// vmware-vmx-*.core, core and core.<digits> (vmdir.IsCoreDumpName).
func LoadLayout(dir string, corePatterns []string) (*Layout, error) {
	dir = filepath.Clean(dir)
	vmxPath, err := vmdir.FindVMX(dir)
	if err != nil {
		return nil, err
	}
	text, err := safeopen.ReadFile(vmxPath, MaxVMXText)
	if err != nil {
		return nil, err
	}
	cfg, err := vmx.Parse(text)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", vmxPath, err)
	}
	l := &Layout{Dir: dir, VMXPath: vmxPath, VMXText: text, VMX: cfg, Sources: []string{vmxPath}}
	l.KeySafe, _ = cfg.Get(VMXKeySafe)
	l.Encrypted = l.KeySafe != ""
	l.VMID, _ = cfg.Get(VMXVMID)
	l.Policy, _ = cfg.Get(VMXPolicy)

	scan, err := vmdir.Scan(dir) // reads through vmdk.OpenIn: no symlink, no FIFO, bounded
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var names []string
	for _, d := range cfg.Disks() {
		if !d.IsHardDisk() || d.FileName == "" {
			continue
		}
		// A slot marked not present whose file is gone (a stale entry)
		// is not a disk of the VM; one whose file exists still is.
		if !d.Present {
			if p, err := vmdk.ResolveExtentPath(dir, d.FileName); err != nil || !exists(p) {
				continue
			}
		}
		names = append(names, d.FileName)
	}
	for _, f := range scan.Files {
		if f.Kind == vmdir.KindVMSD {
			l.Sources = append(l.Sources, filepath.Join(dir, f.Name))
			raw, err := safeopen.ReadFile(filepath.Join(dir, f.Name), MaxVMXText)
			if err != nil {
				return nil, err
			}
			sd, err := vmx.Parse(raw)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", f.Name, err)
			}
			for _, s := range sd.Snapshots() {
				l.Snapshots++
				for _, sdk := range s.Disks {
					names = append(names, sdk.FileName)
				}
			}
		}
	}
	for len(names) > 0 {
		name := names[0]
		names = names[1:]
		p, err := vmdk.ResolveExtentPath(dir, name)
		if err != nil {
			return nil, fmt.Errorf("%s: disk %q: %w", vmxPath, name, err)
		}
		base := filepath.Base(p)
		if seen[base] {
			continue
		}
		seen[base] = true
		d, parent, err := LoadDisk(dir, base)
		if err != nil {
			return nil, err
		}
		l.Sources = append(l.Sources, filepath.Join(dir, base))
		l.Disks = append(l.Disks, d)
		if parent != "" {
			names = append(names, parent)
		}
	}
	// One file belongs to one disk: two descriptors naming the same
	// extent (an alias, an editor's copy that got attached) would have it
	// converted twice, under two keys.
	inDisk := map[string]bool{}
	owner := map[string]string{}
	for _, d := range l.Disks {
		inDisk[d.Name] = true
		for _, e := range d.Extents {
			if o, ok := owner[e]; ok && o != d.Name {
				return nil, fmt.Errorf("%s: file %s belongs to two disks, %s and %s; detach one", dir, e, o, d.Name)
			}
			owner[e] = d.Name
			inDisk[e] = true
		}
	}
	for _, f := range scan.Files {
		if inDisk[f.Name] || container.IsTempName(f.Name) {
			continue
		}
		if k, ok := KindFromDir[f.Kind]; ok {
			l.Files = append(l.Files, DataFile{f.Name, k})
		} else if f.Kind == vmdir.KindCoreDump || (!f.Referenced && matchAny(corePatterns, f.Name)) {
			l.CoreDumps = append(l.CoreDumps, f.Name)
		}
	}
	return l, nil
}

// LoadDisk reads one disk: a text descriptor, a plain sparse extent with
// an embedded descriptor, or such an extent already encrypted.
func LoadDisk(dir, name string) (*Disk, string, error) {
	if strings.ContainsRune(name, '/') {
		return nil, "", fmt.Errorf("disk %q: files in subdirectories are not supported", name)
	}
	path := filepath.Join(dir, name)
	if st, err := os.Lstat(path); err != nil {
		return nil, "", fmt.Errorf("disk %s: %w", path, err)
	} else if !st.Mode().IsRegular() {
		return nil, "", fmt.Errorf("disk %s: not a regular file (%s)", path, st.Mode().Type())
	}
	f, err := safeopen.Open(path, os.O_RDONLY)
	if err != nil {
		return nil, "", fmt.Errorf("disk %s: %w", path, err)
	}
	defer f.Close()
	head := make([]byte, container.HeaderSize)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, "", fmt.Errorf("disk %s: %w", path, err)
	}
	head = head[:n]
	if h, err := container.PeekHeader(head); err == nil {
		// Only a disk file the vmx may name (a .vmdk descriptor, or a
		// sparse disk holding its own) is taken as an encrypted disk
		// here: a vmx naming a data file directly (raw.img, x-flat.vmdk)
		// names bytes a guest writes, which may be another disk's
		// container.
		if _, isExtent := DescriptorName(name); isExtent || !IsVMDKName(name) {
			return nil, "", fmt.Errorf("disk %s: the vmx names a data file directly (an encrypted container where a descriptor belongs)", path)
		}
		ks, ok := container.ReadEmbeddedKeySafe(head)
		if !ok {
			return nil, "", fmt.Errorf("disk %s: encrypted, but its header holds no keySafe", path)
		}
		return &Disk{Name: name, Embedded: true, Extents: []string{name}, DiskID: h.Binding.OwnerID, KeySafe: ks}, "", nil
	}
	if vmdk.IsSparse(head) {
		// The parent of a delta disk is named in its embedded descriptor.
		d, err := vmdk.Open(path, &vmdk.Options{Open: vmdkOpenerIn(dir)})
		if err != nil {
			return nil, "", fmt.Errorf("disk %s: %w", path, err)
		}
		parent, _ := d.Descriptor().ParentFileNameHint()
		d.Close()
		return &Disk{Name: name, Embedded: true, Extents: []string{name}}, parent, nil
	}
	// A text descriptor is a few hundred bytes; never read a huge (or
	// endless) file named by a hostile vmx into memory.
	raw, err := io.ReadAll(io.LimitReader(f, MaxDescriptor+1))
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
		if err == nil {
			raw, err = io.ReadAll(io.LimitReader(f, MaxDescriptor+1))
		}
	}
	if err != nil {
		return nil, "", err
	}
	if len(raw) > MaxDescriptor {
		return nil, "", fmt.Errorf("disk %s: not a VMDK descriptor (larger than %d bytes)", path, MaxDescriptor)
	}
	desc, err := vmdk.ParseDescriptor(raw)
	if err != nil {
		return nil, "", fmt.Errorf("disk %s: %w", path, err)
	}
	// An empty or cut-off file (one being rewritten) parses as a disk
	// with no extents, which would make its extents look unnamed.
	if desc.CreateType() == "" || len(desc.Extents()) == 0 {
		return nil, "", fmt.Errorf("disk %s: not a complete VMDK descriptor (no createType or no extent)", path)
	}
	d := &Disk{Name: name}
	d.KeySafe, _ = desc.Get(DescKeySafe)
	d.DiskID, _ = desc.Get(DDBDiskID)
	for _, e := range desc.Extents() {
		if e.Filename == "" {
			continue // ZERO extents have no file
		}
		p, err := vmdk.ResolveExtentPath(dir, e.Filename)
		if err != nil {
			return nil, "", fmt.Errorf("disk %s: extent %q: %w", path, e.Filename, err)
		}
		if filepath.Dir(p) != filepath.Clean(dir) {
			return nil, "", fmt.Errorf("disk %s: extent %q: files in subdirectories are not supported", path, e.Filename)
		}
		d.Extents = append(d.Extents, filepath.Base(p))
	}
	parent, _ := desc.ParentFileNameHint()
	return d, parent, nil
}

// ExtentCopies looks at the file extents of a disk whose descriptor has
// no encryptionKeys: if every one is a container of one disk (kind
// extent, same binding) carrying the same keySafe copy, it returns that
// binding and copy. That is what a descriptor that lost its key lines
// looks like, but also what a guest can write into its own plain disk
// (another disk's ciphertext, from a backup): so it is never trusted on
// its own, only reported (vm status) and used by an explicit restore
// (RestoreDiskKeys).
func ExtentCopies(dir string, d *Disk) (keys.Binding, string, bool) {
	var b keys.Binding
	var ks string
	for _, e := range d.Extents {
		head, err := container.ReadHead(filepath.Join(dir, e))
		if err != nil {
			return b, "", false
		}
		h, err := container.PeekHeader(head)
		if err != nil || h.Kind != container.KindExtent || h.Binding.Purpose != keys.PurposeDisk {
			return b, "", false
		}
		eks, ok := container.ReadEmbeddedKeySafe(head)
		if !ok || (ks != "" && (h.Binding != b || eks != ks)) {
			return b, "", false
		}
		b, ks = h.Binding, eks
	}
	return b, ks, ks != ""
}

const MaxDescriptor = 1 << 20

// MaxVMXText bounds the vmx, vmsd and journal files read into memory.
const MaxVMXText = 16 << 20

// vmdkFile is a read-only regular file for formats/vmdk.
type vmdkFile struct {
	*os.File
	size int64
}

func (f *vmdkFile) Size() int64 { return f.size }

// vmdkOpenerIn is the vmdk.Opener of loadDisk: the safeopen funnel, for
// files of dir itself only (vmcryptd supports no disk files in
// subdirectories; a delta disk's parent lives beside it).
func vmdkOpenerIn(dir string) vmdk.Opener {
	return func(path string) (vmdk.File, error) {
		if filepath.Dir(path) != filepath.Clean(dir) {
			return nil, fmt.Errorf("%s: files in subdirectories are not supported", path)
		}
		f, err := safeopen.Open(path, os.O_RDONLY)
		if err != nil {
			return nil, err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, err
		}
		return &vmdkFile{File: f, size: st.Size()}, nil
	}
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// NewID returns a random RFC 4122 version-4 UUID string (google/uuid,
// which reads crypto/rand).
func NewID() (string, error) {
	id, err := uuid.NewRandom()
	if err != nil {
		return "", fmt.Errorf("new id: %w", err)
	}
	return id.String(), nil
}

// Journal records an in-progress conversion so a killed one can be
// resumed. It holds wrapped keys only (keySafes), never a plain key.
type Journal struct {
	Version    int           `json:"version"`
	Op         Op            `json:"op"`
	VMID       string        `json:"vm_id"`
	KeySafe    string        `json:"keysafe"`               // target VM keySafe
	OldKeySafe string        `json:"old_keysafe,omitempty"` // rekey-deep: the one being replaced
	Disks      []JournalDisk `json:"disks"`
	Policy     string        `json:"policy,omitempty"`
	// TempTag is a random tag, recorded before the first temporary file
	// is created: this conversion's temporaries are named
	// TmpPrefix+TempTag+"-"+<random>, and they are the only files a later
	// run removes. (One save per conversion, not one per file: a list of
	// names saved before each creation cost O(files^2) on a VM of
	// 10,000 extents.)
	TempTag string `json:"temp_tag,omitempty"`
	// Self is the temporary name this content was written under.
	Self string `json:"self,omitempty"`
}

type JournalDisk struct {
	Name       string `json:"name"`
	DiskID     string `json:"disk_id"`
	KeySafe    string `json:"keysafe"`
	OldKeySafe string `json:"old_keysafe,omitempty"`
}

func journalPath(dir string) string { return filepath.Join(dir, JournalName) }

func LoadJournal(dir string) (*Journal, error) {
	raw, err := safeopen.ReadFile(journalPath(dir), MaxVMXText)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var j Journal
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, fmt.Errorf("%s: %w", journalPath(dir), err)
	}
	if j.Version != 1 {
		return nil, fmt.Errorf("%s: unknown version %d", journalPath(dir), j.Version)
	}
	return &j, nil
}

// save replaces the journal atomically. Its temporary file names itself
// in its content (Self), so a later run can tell a journal temporary a
// kill left (removed) from any other file, whatever its name.
func (j *Journal) Save(dir string) error {
	j.Version = 1
	n, err := container.TempBase()
	if err != nil {
		return err
	}
	j.Self = n
	b, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return err
	}
	return writeNew(filepath.Join(dir, n), journalPath(dir), b, 0o600)
}

// writeNew writes data to tmp (created with O_EXCL, never over a file),
// fsyncs it and renames it over path, then fsyncs the directory.
func writeNew(tmp, path string, data []byte, perm os.FileMode) error {
	return atomicfile.WriteVia(tmp, path, data, perm)
}

// TextWriter atomically replaces a text file.
type TextWriter func(path string, data []byte) error

// WriteText returns the textWriter of a conversion under j: its
// temporary files are journaled like the data files' (see temp).
func (j *Journal) WriteText(dir string) TextWriter {
	return func(path string, data []byte) error {
		tmp, err := j.Temp(dir)(path)
		if err != nil {
			return err
		}
		perm := os.FileMode(0o644)
		if st, err := os.Stat(path); err == nil {
			perm = st.Mode().Perm()
		}
		return writeNew(tmp, path, data, perm)
	}
}

func RemoveJournal(dir string) error {
	if err := os.Remove(journalPath(dir)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return atomicfile.SyncDir(dir)
}

// WriteText atomically replaces a text file, keeping its permissions.
func WriteText(path string, data []byte) error {
	perm := os.FileMode(0o644)
	if st, err := os.Stat(path); err == nil {
		perm = st.Mode().Perm()
	}
	return atomicfile.Write(path, data, perm)
}

// CleanStaleTemps removes the temporary files a killed conversion left:
// only those its journal j records (a name is recorded before the file is
// created with O_EXCL), never a file matched by its name alone, so no
// user file is ever removed. Their originals are intact by construction.
func CleanStaleTemps(dir string, j *Journal) error {
	// A journal temporary names itself in its content.
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if n := e.Name(); container.IsTempName(n) && e.Type().IsRegular() && isJournalTemp(filepath.Join(dir, n)) {
			if err := os.Remove(filepath.Join(dir, n)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("%s: %w", filepath.Join(dir, n), err)
			}
		}
	}
	if j == nil {
		return nil
	}
	if len(j.TempTag) != 32 || strings.Trim(j.TempTag, "0123456789abcdef") != "" {
		return nil // no temporary was created under this journal
	}
	prefix := j.TempPrefix()
	for _, e := range ents {
		if n := e.Name(); strings.HasPrefix(n, prefix) && e.Type().IsRegular() {
			if err := os.Remove(filepath.Join(dir, n)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("%s: %w", filepath.Join(dir, n), err)
			}
		}
	}
	return nil
}

func (j *Journal) TempPrefix() string { return container.TmpPrefix + j.TempTag + "-" }

// isJournalTemp reports whether p is a journal temporary: a small
// regular file whose content is a journal naming p as its Self.
func isJournalTemp(p string) bool {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() || st.Size() > MaxDescriptor {
		return false
	}
	raw, err := io.ReadAll(io.LimitReader(f, MaxDescriptor))
	if err != nil {
		return false
	}
	var j Journal
	return json.Unmarshal(raw, &j) == nil && j.Version == 1 && j.Self == filepath.Base(p)
}

// temp is the TempFunc of a conversion under journal j: the journal's
// TempTag is made durable before the first file is created, and every
// name carries it.
func (j *Journal) Temp(dir string) container.TempFunc {
	return func(path string) (string, error) {
		if filepath.Dir(path) != filepath.Clean(dir) {
			return "", fmt.Errorf("%s: not in the VM directory %s", path, dir)
		}
		if j.TempTag == "" {
			var b [16]byte
			if _, err := rand.Read(b[:]); err != nil {
				return "", fmt.Errorf("crypto/rand: %w", err)
			}
			j.TempTag = hex.EncodeToString(b[:])
			if err := j.Save(dir); err != nil {
				j.TempTag = ""
				return "", err
			}
		}
		var b [8]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", fmt.Errorf("crypto/rand: %w", err)
		}
		return filepath.Join(dir, j.TempPrefix()+hex.EncodeToString(b[:])), nil
	}
}

// EncryptedFilePerm is the permission of a file created for an encrypted
// VM (by vm create --encrypt or through the view): what was asked, less
// every group and other bit and the special bits, so 0600 at most. A view
// mounted with allow_other applies the backing file's mode to the
// decrypted file (default_permissions): a group- or world-readable
// container would be a readable plaintext there.
func EncryptedFilePerm(requested os.FileMode) os.FileMode {
	return requested & 0o600
}

// SetKeyLines sets a disk's two key lines (FORMAT.md 4.3).
func SetKeyLines(desc *vmdk.Descriptor, keySafe, diskID string) error {
	if err := desc.Set(DescKeySafe, keySafe); err != nil {
		return err
	}
	return desc.Set(DDBDiskID, diskID)
}

// extentName matches the extent files qemu-img and ESXi name after their
// descriptor: <base>-flat.vmdk, -sNNN, -fNNN (split disks), -delta and
// -sesparse (snapshot deltas).
var extentName = regexp.MustCompile(`(?i)^(.+)-(flat|s[0-9]{3}|f[0-9]{3}|delta|sesparse)(\.vmdk)$`)

// DescriptorName returns the descriptor file a .vmdk file belongs to: its
// base name for an extent, itself otherwise.
func DescriptorName(name string) (desc string, isExtent bool) {
	if m := extentName.FindStringSubmatch(name); m != nil {
		return m[1] + m[3], true
	}
	return name, false
}

func IsVMDKName(name string) bool { return strings.EqualFold(filepath.Ext(name), ".vmdk") }

// ErrConversionInterrupted marks a VM whose journal shows a conversion
// that did not finish.
var ErrConversionInterrupted = errors.New("conversion interrupted")

// Op names a journalled conversion. The name is what the journal
// records (FORMAT.md 6) and what errors, progress and status show.
type Op string

// The journalled conversions.
const (
	OpEncrypt   Op = "encrypt"
	OpDecrypt   Op = "decrypt"
	OpRekeyDeep Op = "rekey-deep"
)

// Valid reports whether op is one of the journalled conversions.
func (op Op) Valid() bool { return op == OpEncrypt || op == OpDecrypt || op == OpRekeyDeep }

// InterruptedOp returns the operation of an unfinished conversion in dir
// ("" if none).
func InterruptedOp(dir string) (Op, error) {
	j, err := LoadJournal(dir)
	if err != nil || j == nil {
		return "", err
	}
	return j.Op, nil
}

// KindByName picks the container kind of a VM-key file by its name; ""
// means the file is not one the VM key protects.
func KindByName(name string) container.Kind {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".nvram":
		return container.KindNVRAM
	case ".vswp":
		return container.KindVSWP
	case ".vmsn":
		return container.KindVMSN
	case ".vmss":
		return container.KindVMSS
	case ".vmem":
		return container.KindVMEM
	}
	return 0
}

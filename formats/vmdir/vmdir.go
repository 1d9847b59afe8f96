// Package vmdir models a VM directory: which files belong to the VM and
// what each one is. References come from the .vmx, the snapshot
// descriptor (.vmsd) and the disk descriptors; files that nothing
// references are listed too, with a kind guessed from their name.
package vmdir

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"

	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
)

// Kind is what a file in a VM directory is.
type Kind string

const (
	KindConfig     Kind = "config"     // .vmx
	KindDescriptor Kind = "descriptor" // VMDK descriptor (text)
	KindExtent     Kind = "extent"     // VMDK data (flat or sparse, maybe with embedded descriptor)
	KindNVRAM      Kind = "nvram"
	KindVSwap      Kind = "vswp"
	KindVMSN       Kind = "vmsn"     // snapshot state
	KindVMSS       Kind = "vmss"     // suspend state
	KindVMEM       Kind = "vmem"     // guest memory image
	KindVMSD       Kind = "vmsd"     // snapshot descriptor
	KindCoreDump   Kind = "coredump" // *.zdump, vmware-vmx-*.core, core, core.<digits>
	KindLog        Kind = "log"
	KindOther      Kind = "other" // a device file the vmx names (floppy, CD image...)
	KindUnknown    Kind = "unknown"
)

// File is one regular file of the directory.
type File struct {
	Name       string `json:"name"` // base name
	Kind       Kind   `json:"kind"`
	Size       int64  `json:"size"`
	Referenced bool   `json:"referenced"`           // named by the vmx, vmsd or a descriptor
	Disk       string `json:"disk,omitempty"`       // for descriptors and extents: the descriptor of the disk
	Embedded   bool   `json:"embedded,omitempty"`   // extent that carries its own descriptor
	Encrypted  bool   `json:"encrypted,omitempty"`  // set by callers that recognise the container
	References string `json:"references,omitempty"` // who references it (e.g. "vmx scsi0:0")
}

// Dir is the scanned directory.
type Dir struct {
	Path  string
	VMX   string // base name of the .vmx
	Files []File // sorted by name
	// Missing lists referenced names that are not in the directory.
	Missing []string
	// Problems lists references that could not be followed (unparsable
	// descriptor, path outside the directory, ...). Scan still succeeds.
	Problems []string

	byName  map[string]int
	missing map[string]bool
	budget  int64 // descriptor bytes Scan may still read
}

// ErrNoVMX means a directory holds no .vmx: it is not a VM directory
// (several .vmx files are a different error: a VM directory that cannot
// be read).
var ErrNoVMX = errors.New("no .vmx file")

// Limits that bound the work of Scan whatever the directory holds.
const (
	// MaxEntries bounds the entries of a VM directory (a VM has tens of
	// files; a twoGbMaxExtent disk of 62 TB has 31,745).
	MaxEntries = 1 << 16
	// maxScanBytes bounds the descriptor bytes one Scan reads in all.
	maxScanBytes = 64 << 20
	// headSize is how much of a file is read to classify it.
	headSize = 4096
)

// readDir lists dir, refusing one with more than MaxEntries entries
// without reading them all.
func readDir(dir string) ([]os.DirEntry, error) {
	// O_DIRECTORY: a FIFO put in the directory's place fails at once
	// instead of blocking the open.
	f, err := os.OpenFile(dir, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []os.DirEntry
	for {
		ents, err := f.ReadDir(1024)
		out = append(out, ents...)
		if len(out) > MaxEntries {
			return nil, fmt.Errorf("%s: more than %d entries; not read as a VM directory", dir, MaxEntries)
		}
		if err == io.EOF || (err == nil && len(ents) == 0) {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name() < out[j].Name() })
	return out, nil
}

// FindVMX returns the path of the only .vmx in dir.
func FindVMX(dir string) (string, error) {
	ents, err := readDir(dir)
	if err != nil {
		return "", err
	}
	var found []string
	for _, e := range ents {
		if e.Type().IsRegular() && strings.EqualFold(filepath.Ext(e.Name()), ".vmx") {
			found = append(found, e.Name())
		}
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("%s: %w", dir, ErrNoVMX)
	case 1:
		return filepath.Join(dir, found[0]), nil
	}
	return "", fmt.Errorf("%s: several .vmx files: %s", dir, strings.Join(found, ", "))
}

// Scan reads dir: its .vmx, the snapshot descriptor and every disk
// descriptor they name, and classifies each regular file. Every file is
// read through vmdk.OpenIn/ReadRegular (no symlink, never a FIFO, bounded).
func Scan(dir string) (*Dir, error) {
	vmxPath, err := FindVMX(dir)
	if err != nil {
		return nil, err
	}
	ents, err := readDir(dir)
	if err != nil {
		return nil, err
	}
	d := &Dir{Path: dir, VMX: filepath.Base(vmxPath), byName: map[string]int{}, missing: map[string]bool{}, budget: maxScanBytes}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			// Never opened: a FIFO would block, a symlink may lead
			// anywhere. Subdirectories are simply not part of the VM.
			if what := otherType(e.Type()); what != "" {
				d.Problems = append(d.Problems, fmt.Sprintf("%s: is %s, not a regular file; not read", e.Name(), what))
			}
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		d.byName[e.Name()] = len(d.Files)
		d.Files = append(d.Files, File{Name: e.Name(), Size: info.Size()})
	}
	d.mark(d.VMX, KindConfig, "", "")
	text, err := vmdk.ReadRegular(vmxPath, vmx.MaxSize)
	if err != nil {
		return nil, err
	}
	cfg, err := vmx.Parse(text)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", vmxPath, err)
	}
	d.scanVMX(cfg)
	for i := range d.Files {
		if f := &d.Files[i]; f.Kind == "" {
			f.Kind = d.guess(f.Name)
		}
	}
	sort.Slice(d.Files, func(i, j int) bool { return d.Files[i].Name < d.Files[j].Name })
	for i, f := range d.Files {
		d.byName[f.Name] = i
	}
	sort.Strings(d.Missing)
	return d, nil
}

// Lookup returns the entry for a base name.
func (d *Dir) Lookup(name string) (File, bool) {
	i, ok := d.byName[name]
	if !ok {
		return File{}, false
	}
	return d.Files[i], true
}

// Unreferenced returns the files nothing references.
func (d *Dir) Unreferenced() []File {
	var out []File
	for _, f := range d.Files {
		if !f.Referenced {
			out = append(out, f)
		}
	}
	return out
}

// local maps a reference from a config file to a base name in the
// directory. Relative names are taken relative to the directory; absolute
// ones (ESXi writes /vmfs/volumes/<ds>/<vm>/x) count when they end in a
// file that is here, since the datastore path cannot be checked locally.
func (d *Dir) local(ref string) (string, bool) {
	if ref == "" {
		return "", false
	}
	if filepath.IsAbs(ref) {
		base := filepath.Base(ref)
		_, ok := d.byName[base]
		return base, ok
	}
	p, err := vmdk.ResolveExtentPath(d.Path, ref)
	if err != nil || filepath.Dir(p) != filepath.Clean(d.Path) {
		return "", false
	}
	return filepath.Base(p), true
}

// mark records that name is referenced as kind.
func (d *Dir) mark(name string, kind Kind, disk, by string) {
	i, ok := d.byName[name]
	if !ok {
		if !d.missing[name] {
			d.missing[name] = true
			d.Missing = append(d.Missing, name)
		}
		return
	}
	f := &d.Files[i]
	f.Referenced = true
	if f.Kind == "" || f.Kind == KindUnknown {
		f.Kind = kind
	}
	if f.Disk == "" {
		f.Disk = disk
	}
	if f.References == "" {
		f.References = by
	}
}

func (d *Dir) ref(ref string, kind Kind, by string) {
	if ref == "" {
		return
	}
	name, ok := d.local(ref)
	if !ok {
		if !filepath.IsAbs(ref) {
			d.Problems = append(d.Problems, fmt.Sprintf("%s: %q is not a file of the VM directory", by, ref))
		}
		return
	}
	d.mark(name, kind, "", by)
}

func (d *Dir) scanVMX(cfg *vmx.File) {
	base := strings.TrimSuffix(d.VMX, filepath.Ext(d.VMX))
	nv := cfg.NVRAM()
	if nv == "" {
		nv = base + ".nvram"
	}
	d.ref(nv, KindNVRAM, "vmx nvram")
	if sw := cfg.SwapDerivedName(); sw != "" {
		if name, ok := d.local(sw); ok {
			if _, here := d.byName[name]; here {
				d.mark(name, KindVSwap, "", "vmx "+vmx.KeySwapDerivedName)
			}
		}
	}
	if st := cfg.CheckpointVMState(); st != "" {
		d.ref(st, CheckpointKind(st), "vmx "+vmx.KeyCheckpointVMState)
	}
	for _, disk := range cfg.Disks() {
		if !disk.IsHardDisk() {
			continue
		}
		d.disk(disk.FileName, "vmx "+disk.Device)
	}
	// Every other file the vmx names (floppy and CD images, serial port
	// files...) is a device's, written by the guest: never a core dump.
	for _, k := range cfg.Keys() {
		if !strings.HasSuffix(strings.ToLower(k), ".filename") {
			continue
		}
		v, _ := cfg.Get(k)
		if name, ok := d.local(v); ok {
			if _, here := d.byName[name]; here {
				d.mark(name, KindOther, "", "vmx "+k) // keeps a kind already given
			}
		}
	}
	vmsd := base + ".vmsd"
	if _, ok := d.byName[vmsd]; ok {
		d.mark(vmsd, KindVMSD, "", "vmx")
		text, err := vmdk.ReadRegular(filepath.Join(d.Path, vmsd), vmx.MaxSize)
		if err != nil {
			d.Problems = append(d.Problems, err.Error())
			return
		}
		sd, err := vmx.Parse(text)
		if err != nil {
			d.Problems = append(d.Problems, fmt.Sprintf("%s: %v", vmsd, err))
			return
		}
		for _, s := range sd.Snapshots() {
			by := fmt.Sprintf("vmsd snapshot%d", s.Index)
			d.ref(s.FileName, KindVMSN, by)
			for _, sdisk := range s.Disks {
				d.disk(sdisk.FileName, by)
			}
		}
	}
}

// CheckpointKind is the kind of the file checkpoint.vmState names: the
// suspend state (vmss), or, after ESXi reverted to a memory snapshot, that
// snapshot's state file (a .vmsn).
func CheckpointKind(name string) Kind {
	if strings.EqualFold(filepath.Ext(name), ".vmsn") {
		return KindVMSN
	}
	return KindVMSS
}

// disk marks a descriptor and its extents, following parent links so that
// the base disks of snapshot chains are claimed too.
func (d *Dir) disk(ref, by string) {
	for depth := 0; ref != "" && depth < 64; depth++ {
		name, ok := d.local(ref)
		if !ok {
			if !filepath.IsAbs(ref) {
				d.Problems = append(d.Problems, fmt.Sprintf("%s: disk %q is not a file of the VM directory", by, ref))
			}
			return
		}
		if i, seen := d.byName[name]; seen && d.Files[i].Disk != "" {
			return // already walked
		}
		desc, embedded, err := d.readDescriptor(name)
		if err != nil {
			if _, here := d.byName[name]; here {
				d.Problems = append(d.Problems, fmt.Sprintf("%s: %v", name, err))
			}
			d.mark(name, KindDescriptor, name, by)
			return
		}
		if embedded {
			d.mark(name, KindExtent, name, by)
			if i, ok := d.byName[name]; ok {
				d.Files[i].Embedded = true
			}
		} else {
			d.mark(name, KindDescriptor, name, by)
			for _, x := range desc.Extents() {
				if x.Filename == "" {
					continue
				}
				p, err := vmdk.ResolveExtentPath(d.Path, x.Filename)
				if err != nil {
					d.Problems = append(d.Problems, fmt.Sprintf("%s: extent: %v", name, err))
					continue
				}
				if filepath.Dir(p) != filepath.Clean(d.Path) {
					d.Problems = append(d.Problems, fmt.Sprintf("%s: extent %q is in a subdirectory", name, x.Filename))
					continue
				}
				d.mark(filepath.Base(p), KindExtent, name, "descriptor "+name)
			}
		}
		by = "descriptor " + name + " parent"
		ref, _ = desc.ParentFileNameHint()
		if pc, err := desc.ParentCID(); err == nil && pc == 0xffffffff {
			ref = ""
		}
	}
}

// readDescriptor reads the descriptor of the file name, embedded (in a
// sparse extent) or not. It reads at most what the descriptor needs: the
// head, the embedded descriptor area, or a text file of at most
// vmdk.MaxDescriptorSize bytes, and no more than the scan's budget in all.
func (d *Dir) readDescriptor(name string) (*vmdk.Descriptor, bool, error) {
	f, st, err := vmdk.OpenIn(d.Path, name)
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	head := make([]byte, min(st.Size(), headSize))
	if _, err := io.ReadFull(f, head); err != nil {
		return nil, false, err
	}
	if vmdk.IsSparse(head) {
		text, err := vmdk.ReadEmbeddedDescriptor(f, st.Size(), f.Name())
		if err != nil {
			return nil, true, err
		}
		if err := d.spend(int64(len(text))); err != nil {
			return nil, true, err
		}
		desc, err := vmdk.ParseDescriptor(text)
		return desc, true, err
	}
	if st.Size() > vmdk.MaxDescriptorSize || !vmdk.IsDescriptorText(head) {
		return nil, false, fmt.Errorf("not a descriptor")
	}
	text := head
	if bytes.IndexByte(head, 0) < 0 && st.Size() > int64(len(head)) {
		// No NUL padding in sight: the text goes on past the head.
		if err := d.spend(st.Size()); err != nil {
			return nil, false, err
		}
		text = make([]byte, st.Size())
		if _, err := io.ReadFull(io.NewSectionReader(f, 0, st.Size()), text); err != nil {
			return nil, false, fmt.Errorf("%s: %w", f.Name(), err)
		}
	}
	// A padded descriptor ends in its head: qemu reads up to the first
	// NUL too, whatever follows the head.
	if i := bytes.IndexByte(text, 0); i >= 0 {
		text = text[:i]
	}
	desc, err := vmdk.ParseDescriptor(text)
	return desc, false, err
}

// spend takes n bytes from the scan's read budget.
func (d *Dir) spend(n int64) error {
	if n > d.budget {
		d.budget = 0
		return fmt.Errorf("not read: the scan already read %d MiB of descriptors", maxScanBytes>>20)
	}
	d.budget -= n
	return nil
}

// otherType names a directory entry type that Scan reports and never
// opens; "" for regular files and directories.
func otherType(t os.FileMode) string {
	switch {
	case t.IsRegular(), t.IsDir():
		return ""
	case t&os.ModeSymlink != 0:
		return "a symbolic link"
	case t&os.ModeNamedPipe != 0:
		return "a FIFO (named pipe)"
	case t&os.ModeSocket != 0:
		return "a socket"
	case t&os.ModeCharDevice != 0:
		return "a character device"
	case t&os.ModeDevice != 0:
		return "a block device"
	}
	return "of another type"
}

// coreName is the name a Linux core dump gets: core or core.<pid>.
var coreName = regexp.MustCompile(`^core(\.[0-9]+)?$`)

// IsCoreDumpName reports whether name is one core dumps get: *.zdump,
// vmware-vmx-*.core, core, core.<digits>. Nothing broader: a name is what
// lets a container be opened with the key in its own header, so a guest's
// "coreos.img" must not qualify.
func IsCoreDumpName(name string) bool {
	lower := strings.ToLower(name)
	ext := filepath.Ext(lower)
	return ext == ".zdump" || strings.HasPrefix(lower, "vmware-vmx-") && ext == ".core" || coreName.MatchString(lower)
}

// guess classifies an unreferenced file by its name, and for .vmdk files
// by a glance at its head (never the whole file).
func (d *Dir) guess(name string) Kind {
	lower := strings.ToLower(name)
	ext := filepath.Ext(lower)
	switch {
	case ext == ".vmx":
		return KindConfig
	case ext == ".nvram":
		return KindNVRAM
	case ext == ".vswp":
		return KindVSwap
	case ext == ".vmsn":
		return KindVMSN
	case ext == ".vmss":
		return KindVMSS
	case ext == ".vmem":
		return KindVMEM
	case ext == ".vmsd":
		return KindVMSD
	case ext == ".log":
		return KindLog
	case IsCoreDumpName(name):
		return KindCoreDump
	case ext == ".vmdk":
		if head, err := vmdk.ReadHead(filepath.Join(d.Path, name), headSize); err == nil && vmdk.IsDescriptorText(head) {
			return KindDescriptor
		}
		return KindExtent
	}
	return KindUnknown
}

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
	open    Opener
}

// Opener opens a file of the directory for reading. It must refuse what
// is not a regular file without blocking (a FIFO named as a descriptor
// would stall a plain open forever): vmcryptd passes its safeopen funnel.
type Opener func(path string) (*os.File, error)

func osOpen(path string) (*os.File, error) { return os.Open(path) }

// readAll reads the file at path through the Dir's Opener.
func (d *Dir) readAll(path string) ([]byte, error) {
	f, err := d.open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

// ErrNoVMX means a directory holds no .vmx: it is not a VM directory
// (several .vmx files are a different error: a VM directory that cannot
// be read).
var ErrNoVMX = errors.New("no .vmx file")

// FindVMX returns the path of the only .vmx in dir.
func FindVMX(dir string) (string, error) {
	ents, err := os.ReadDir(dir)
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
// descriptor they name, and classifies each regular file. It opens files
// with os.Open; ScanWith takes the Opener to use instead.
func Scan(dir string) (*Dir, error) {
	return ScanWith(dir, nil)
}

// ScanWith is Scan opening every file through open (nil: os.Open).
func ScanWith(dir string, open Opener) (*Dir, error) {
	if open == nil {
		open = osOpen
	}
	vmxPath, err := FindVMX(dir)
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	d := &Dir{Path: dir, VMX: filepath.Base(vmxPath), byName: map[string]int{}, missing: map[string]bool{}, open: open}
	for _, e := range ents {
		if !e.Type().IsRegular() {
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
	text, err := d.readAll(vmxPath)
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
		d.ref(st, KindVMSS, "vmx "+vmx.KeyCheckpointVMState)
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
		text, err := d.readAll(filepath.Join(d.Path, vmsd))
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
		desc, embedded, err := d.readDescriptor(filepath.Join(d.Path, name))
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

// readDescriptor reads the descriptor at path, embedded or not.
func (d *Dir) readDescriptor(path string) (*vmdk.Descriptor, bool, error) {
	f, err := d.open(path)
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, false, err
	}
	head := make([]byte, min(st.Size(), vmdk.SectorSize))
	if _, err := io.ReadFull(f, head); err != nil {
		return nil, false, err
	}
	if vmdk.IsSparse(head) {
		s, err := vmdk.OpenSparse(f, st.Size(), path)
		if err != nil {
			return nil, true, err
		}
		text, err := s.EmbeddedDescriptor()
		if err != nil {
			return nil, true, err
		}
		desc, err := vmdk.ParseDescriptor(text)
		return desc, true, err
	}
	if st.Size() > vmdk.MaxDescriptorSize || !looksLikeText(head) {
		return nil, false, fmt.Errorf("not a descriptor")
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, false, err
	}
	text, err := io.ReadAll(io.LimitReader(f, vmdk.MaxDescriptorSize))
	if err != nil {
		return nil, false, err
	}
	desc, err := vmdk.ParseDescriptor(text)
	return desc, false, err
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

func looksLikeText(b []byte) bool {
	return !bytes.ContainsRune(b, 0)
}

// guess classifies an unreferenced file by its name, and for .vmdk files
// by a glance at the first sector.
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
		if _, embedded, err := d.readDescriptor(filepath.Join(d.Path, name)); err == nil && !embedded {
			return KindDescriptor
		}
		return KindExtent
	}
	return KindUnknown
}

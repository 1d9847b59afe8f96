// Package inspect describes a VM file or VM directory for people and
// scripts: `vmcryptd inspect PATH [--json]`.
package inspect

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmware/govmomi/crypto"

	"github.com/vmcryptd/vmcryptd/formats/nvram"
	"github.com/vmcryptd/vmcryptd/formats/vmdir"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
)

// HeaderSize is how many leading bytes of each file are given to
// Options.Detector.
const HeaderSize = 4096

// Options configures InspectWith.
type Options struct {
	// Detector recognises vmcryptd's encrypted container from the first
	// HeaderSize bytes of a file (fewer for short files). When it returns
	// ok, the file is reported with encrypted_container=true and info, and
	// its payload is not parsed (it is ciphertext). Nil: nothing is
	// recognised, every encrypted_container is false.
	Detector func(header []byte) (info any, ok bool)
	// VMDK is passed to vmdk.Open, e.g. with an opener that decrypts.
	VMDK *vmdk.Options
}

// Kinds of report.
const (
	KindVMDK      = "vmdk"
	KindExtent    = "extent" // VMDK data file without descriptor (flat)
	KindNVRAM     = "nvram"
	KindVMX       = "vmx"
	KindVMSD      = "vmsd"
	KindDirectory = "directory"
	KindUnknown   = "unknown"
)

// Report is the result of Inspect. Only the fields of its kind are set.
type Report struct {
	Path               string `json:"path"`
	Kind               string `json:"kind"`
	Size               int64  `json:"size"` // file size; 0 for directories
	EncryptedContainer bool   `json:"encrypted_container"`
	Container          any    `json:"container,omitempty"` // Detector's info

	// vmdk
	Subformat          string       `json:"subformat,omitempty"` // createType
	VirtualSize        int64        `json:"virtual_size,omitempty"`
	CID                string       `json:"cid,omitempty"`
	ParentCID          string       `json:"parent_cid,omitempty"`
	Parent             string       `json:"parent,omitempty"` // parentFileNameHint
	EmbeddedDescriptor bool         `json:"embedded_descriptor,omitempty"`
	Extents            []Extent     `json:"extents,omitempty"`
	EncryptionKeys     []KeyRef     `json:"encryption_keys,omitempty"` // descriptor encryptionKeys
	Sparse             *SparseInfo  `json:"sparse,omitempty"`          // first sparse extent's header
	NVRAM              *NVRAMReport `json:"nvram,omitempty"`

	// vmx (also filled for a directory, from its .vmx)
	DisplayName string     `json:"display_name,omitempty"`
	Encrypted   *bool      `json:"encrypted,omitempty"` // encryption.keySafe present
	KeyIDs      []KeyRef   `json:"key_ids,omitempty"`   // from encryption.keySafe
	Disks       []VMXDisk  `json:"disks,omitempty"`
	Snapshots   []Snapshot `json:"snapshots,omitempty"` // vmsd

	// directory
	VMX     string    `json:"vmx,omitempty"`
	Files   []DirFile `json:"files,omitempty"`
	Missing []string  `json:"missing,omitempty"`

	Warnings []string `json:"warnings,omitempty"`
}

// Extent is one VMDK extent.
type Extent struct {
	Path               string `json:"path"`
	Type               string `json:"type"`
	Access             string `json:"access"`
	Sectors            int64  `json:"sectors"`
	Offset             int64  `json:"offset,omitempty"` // sectors into the file (FLAT)
	FileSize           int64  `json:"file_size,omitempty"`
	GrainSize          int64  `json:"grain_size,omitempty"` // bytes
	AllocatedBytes     *int64 `json:"allocated_bytes,omitempty"`
	StreamOptimized    bool   `json:"stream_optimized,omitempty"`
	EncryptedContainer bool   `json:"encrypted_container"`
}

// SparseInfo summarises a hosted sparse header.
type SparseInfo struct {
	Version           uint32 `json:"version"`
	Flags             uint32 `json:"flags"`
	CapacitySectors   uint64 `json:"capacity_sectors"`
	GrainSize         int64  `json:"grain_size"` // bytes
	GTEsPerGT         uint32 `json:"gtes_per_gt"`
	OverheadSectors   uint64 `json:"overhead_sectors"`
	CompressAlgorithm uint16 `json:"compress_algorithm"`
	UncleanShutdown   bool   `json:"unclean_shutdown"`
}

// KeyRef is one key reference of a KeyLocator: the key provider (KMS
// cluster) and the key id.
type KeyRef struct {
	ProviderID string `json:"provider_id"`
	KeyID      string `json:"key_id"`
	MAC        string `json:"mac,omitempty"` // MAC name of the pair holding it
}

// NVRAMReport lists nvram entries and UEFI variables.
type NVRAMReport struct {
	Version       uint32         `json:"version"`
	Entries       []NVRAMEntry   `json:"entries"`
	UEFIVariables []UEFIVariable `json:"uefi_variables,omitempty"`
	TrailerBytes  int            `json:"trailer_bytes,omitempty"`
}

// NVRAMEntry is a top-level nvram entry.
type NVRAMEntry struct {
	Name string `json:"name"` // "name/subname"
	Size int    `json:"size"`
}

// UEFIVariable is one record of the VMWNVRAM store.
type UEFIVariable struct {
	Name       string `json:"name"`
	GUID       string `json:"guid"`
	Attributes uint32 `json:"attributes"`
	Size       int    `json:"size"` // value bytes
}

// VMXDisk is a disk slot of the .vmx.
type VMXDisk struct {
	Device   string `json:"device"`
	FileName string `json:"file_name"`
	Present  bool   `json:"present"`
	Type     string `json:"device_type,omitempty"`
}

// Snapshot is a snapshot of a .vmsd.
type Snapshot struct {
	UID         string   `json:"uid"`
	DisplayName string   `json:"display_name,omitempty"`
	File        string   `json:"file"`
	Disks       []string `json:"disks,omitempty"`
}

// DirFile is one file of a VM directory.
type DirFile struct {
	Name               string `json:"name"`
	Kind               string `json:"kind"`
	Size               int64  `json:"size"`
	Referenced         bool   `json:"referenced"`
	Disk               string `json:"disk,omitempty"`
	EncryptedContainer bool   `json:"encrypted_container"`
}

// Inspect describes the file or VM directory at path.
func Inspect(path string) (*Report, error) { return InspectWith(path, Options{}) }

// InspectWith is Inspect with options. It never follows a symbolic link
// (path itself may not be one) and never blocks: every file is opened
// with O_NOFOLLOW|O_NONBLOCK and its type checked on the descriptor; a
// FIFO, socket or device is refused with one line naming it. What it
// reads and allocates is bounded whatever the size of the files.
func InspectWith(path string, opts Options) (*Report, error) {
	lst, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if lst.IsDir() {
		return inspectDir(path, opts)
	}
	f, st, err := vmdk.OpenRegular(path)
	if err != nil {
		return nil, err
	}
	r := &Report{Path: path, Size: st.Size(), Kind: KindUnknown}
	head, err := readAll(f, HeaderSize)
	f.Close()
	if err != nil {
		return nil, err
	}
	if opts.Detector != nil {
		if info, ok := opts.Detector(head); ok {
			r.EncryptedContainer, r.Container = true, info
			r.Kind = kindByName(path)
			return r, nil
		}
	}
	switch {
	case vmdk.IsSparse(head), vmdk.IsDescriptorText(head):
		r.Kind = KindVMDK
		err = inspectVMDK(r, opts)
	case bytes.HasPrefix(head, []byte(nvram.Magic)):
		r.Kind = KindNVRAM
		err = inspectNVRAM(r)
	case hasExt(path, ".vmsd"):
		r.Kind = KindVMSD
		err = inspectVMSD(r)
	case hasExt(path, ".vmx"):
		r.Kind = KindVMX
		err = inspectVMX(r)
	case hasExt(path, ".vmdk"):
		r.Kind = KindExtent
	}
	if err != nil {
		return nil, err
	}
	return r, nil
}

// readHead reads the first HeaderSize bytes of a regular file, never
// following a symlink nor blocking on a FIFO.
func readHead(path string) ([]byte, error) { return vmdk.ReadHead(path, HeaderSize) }

func readAll(f *os.File, n int) ([]byte, error) {
	b := make([]byte, n)
	k, err := io.ReadFull(f, b)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return nil, fmt.Errorf("%s: %w", f.Name(), err)
	}
	return b[:k], nil
}

func hasExt(path, ext string) bool { return strings.EqualFold(filepath.Ext(path), ext) }

// kindByName names the kind of an encrypted file, whose content says
// nothing.
func kindByName(path string) string {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".vmdk":
		return KindExtent
	case ".nvram":
		return KindNVRAM
	}
	return KindUnknown
}

func inspectVMDK(r *Report, opts Options) error {
	d, err := vmdk.Open(r.Path, opts.VMDK)
	if err != nil {
		// A descriptor whose extents cannot be read (missing, encrypted,
		// unsupported type) still says a lot: report it with a warning.
		head, herr := readHead(r.Path)
		if herr != nil || vmdk.IsSparse(head) {
			return err
		}
		text, rerr := vmdk.ReadRegular(r.Path, vmdk.MaxDescriptorSize)
		if rerr != nil {
			return err
		}
		desc, perr := vmdk.ParseDescriptor(text)
		if perr != nil {
			return fmt.Errorf("%s: %w", r.Path, perr)
		}
		r.Warnings = append(r.Warnings, "extents not readable: "+err.Error())
		describeDescriptor(r, desc)
		dir := filepath.Dir(r.Path)
		for _, x := range desc.Extents() {
			e := Extent{Type: x.Type, Access: x.Access, Sectors: x.Sectors, Offset: x.Offset}
			if x.Filename != "" {
				if p, err := vmdk.ResolveExtentPath(dir, x.Filename); err == nil {
					e.Path = p
					e.EncryptedContainer = detect(p, opts)
					if st, err := os.Stat(p); err == nil {
						e.FileSize = st.Size()
					}
				} else {
					e.Path = x.Filename
				}
			}
			r.VirtualSize += x.Sectors * vmdk.SectorSize
			r.Extents = append(r.Extents, e)
		}
		return nil
	}
	defer d.Close()
	r.VirtualSize = d.Size()
	r.EmbeddedDescriptor = d.EmbeddedDescriptor()
	if desc := d.Descriptor(); desc != nil {
		describeDescriptor(r, desc)
	} else {
		r.Warnings = append(r.Warnings, "sparse extent without embedded descriptor (part of a split disk?)")
	}
	for i, x := range d.Extents() {
		e := Extent{Path: x.Path, Type: x.Type, Access: x.Access, Sectors: x.Sectors, Offset: x.Offset,
			FileSize: x.FileSize, GrainSize: x.GrainSize, StreamOptimized: x.StreamOptimized}
		if x.Path != "" && x.Path != r.Path {
			e.EncryptedContainer = detect(x.Path, opts)
		}
		if n, err := d.AllocatedBytes(i); err == nil {
			e.AllocatedBytes = &n
		} else {
			r.Warnings = append(r.Warnings, err.Error())
		}
		r.Extents = append(r.Extents, e)
	}
	if head, err := readHead(r.Path); err == nil && vmdk.IsSparse(head) {
		if h, err := vmdk.ParseSparseHeader(head); err == nil {
			r.Sparse = sparseInfo(h)
		}
	} else if len(r.Extents) > 0 && r.Extents[0].GrainSize > 0 {
		if head, err := readHead(r.Extents[0].Path); err == nil {
			if h, err := vmdk.ParseSparseHeader(head); err == nil {
				r.Sparse = sparseInfo(h)
			}
		}
	}
	return nil
}

func sparseInfo(h *vmdk.SparseHeader) *SparseInfo {
	return &SparseInfo{Version: h.Version, Flags: h.Flags, CapacitySectors: h.Capacity,
		GrainSize: int64(h.GrainSize) * vmdk.SectorSize, GTEsPerGT: h.NumGTEsPerGT,
		OverheadSectors: h.OverHead, CompressAlgorithm: h.CompressAlgorithm, UncleanShutdown: h.UncleanShutdown != 0}
}

func describeDescriptor(r *Report, desc *vmdk.Descriptor) {
	r.Subformat = desc.CreateType()
	r.CID, _ = desc.Get("CID")
	r.ParentCID, _ = desc.Get("parentCID")
	r.Parent, _ = desc.ParentFileNameHint()
	kl, err := desc.EncryptionKeys()
	if err != nil {
		r.Warnings = append(r.Warnings, err.Error())
	}
	r.EncryptionKeys = KeyRefs(kl)
}

func detect(path string, opts Options) bool {
	if opts.Detector == nil {
		return false
	}
	head, err := readHead(path)
	if err != nil {
		return false
	}
	_, ok := opts.Detector(head)
	return ok
}

// KeyRefs lists the fully-qualified key ids (provider, key) that a
// KeyLocator refers to, walking lists and pairs.
func KeyRefs(kl *crypto.KeyLocator) []KeyRef {
	var out []KeyRef
	var walk func(kl *crypto.KeyLocator, mac string, depth int)
	walk = func(kl *crypto.KeyLocator, mac string, depth int) {
		if kl == nil || depth > 32 {
			return
		}
		switch kl.Type {
		case crypto.KeyLocatorTypeList:
			for _, e := range kl.List {
				walk(e, mac, depth+1)
			}
		case crypto.KeyLocatorTypePair:
			if kl.Pair != nil {
				walk(kl.Pair.Locker, kl.Pair.CryptoMAC, depth+1)
			}
		case crypto.KeyLocatorTypeFQID:
			if kl.Indirect != nil {
				out = append(out, KeyRef{ProviderID: kl.Indirect.FQID.KeyServerID, KeyID: kl.Indirect.FQID.KeyID, MAC: mac})
			}
		}
	}
	walk(kl, "", 0)
	return out
}

func inspectNVRAM(r *Report) error {
	b, err := vmdk.ReadRegular(r.Path, nvram.MaxSize)
	if err != nil {
		return err
	}
	f, err := nvram.Parse(b)
	if err != nil {
		return fmt.Errorf("%s: %w", r.Path, err)
	}
	n := &NVRAMReport{Version: f.Version, TrailerBytes: len(f.Trailer)}
	for _, e := range f.Entries {
		n.Entries = append(n.Entries, NVRAMEntry{Name: e.Label(), Size: len(e.Data)})
		if e.StoreErr != nil {
			r.Warnings = append(r.Warnings, e.StoreErr.Error())
		}
		if e.Store == nil {
			continue
		}
		for _, v := range e.Store.Vars {
			n.UEFIVariables = append(n.UEFIVariables, UEFIVariable{Name: v.Name(), GUID: v.GUID.String(), Attributes: v.Attributes, Size: len(v.Value)})
		}
	}
	if n.TrailerBytes > 0 {
		r.Warnings = append(r.Warnings, fmt.Sprintf("%d bytes after the last entry", n.TrailerBytes))
	}
	r.NVRAM = n
	return nil
}

func readConfig(path string) (*vmx.File, error) {
	b, err := vmdk.ReadRegular(path, vmx.MaxSize)
	if err != nil {
		return nil, err
	}
	f, err := vmx.Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

func inspectVMX(r *Report) error {
	f, err := readConfig(r.Path)
	if err != nil {
		return err
	}
	describeVMX(r, f)
	return nil
}

func describeVMX(r *Report, f *vmx.File) {
	r.DisplayName = f.DisplayName()
	enc := f.Encrypted()
	r.Encrypted = &enc
	kl, err := f.KeySafe()
	if err != nil {
		r.Warnings = append(r.Warnings, err.Error())
	}
	r.KeyIDs = KeyRefs(kl)
	for _, d := range f.Disks() {
		if d.IsHardDisk() {
			r.Disks = append(r.Disks, VMXDisk{Device: d.Device, FileName: d.FileName, Present: d.Present, Type: d.DeviceType})
		}
	}
}

func inspectVMSD(r *Report) error {
	f, err := readConfig(r.Path)
	if err != nil {
		return err
	}
	for _, s := range f.Snapshots() {
		sn := Snapshot{UID: s.UID, DisplayName: s.DisplayName, File: s.FileName}
		for _, d := range s.Disks {
			sn.Disks = append(sn.Disks, d.FileName)
		}
		r.Snapshots = append(r.Snapshots, sn)
	}
	return nil
}

func inspectDir(path string, opts Options) (*Report, error) {
	d, err := vmdir.Scan(path)
	if err != nil {
		return nil, err
	}
	r := &Report{Path: path, Kind: KindDirectory, VMX: d.VMX, Missing: d.Missing, Warnings: d.Problems}
	for _, f := range d.Files {
		r.Files = append(r.Files, DirFile{Name: f.Name, Kind: string(f.Kind), Size: f.Size, Referenced: f.Referenced,
			Disk: f.Disk, EncryptedContainer: detect(filepath.Join(path, f.Name), opts)})
	}
	cfg, err := readConfig(filepath.Join(path, d.VMX))
	if err != nil {
		return nil, err
	}
	describeVMX(r, cfg)
	return r, nil
}

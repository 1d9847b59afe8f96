package vmx

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/crypto"

	"github.com/vmcryptd/vmcryptd/formats/keylocator"
)

// Well-known keys.
const (
	KeyEncoding          = ".encoding"
	KeyDisplayName       = "displayName"
	KeyNVRAM             = "nvram"
	KeySwapDerivedName   = "sched.swap.derivedName"
	KeyCheckpointVMState = "checkpoint.vmState"
	KeyUUIDBios          = "uuid.bios"
	KeyVCUUID            = "vc.uuid"
	KeyKeySafe           = "encryption.keySafe"
	KeyEncryptionData    = "encryption.data"
)

func (f *File) get(k string) string {
	v, _ := f.Get(k)
	return v
}

// Encoding returns the .encoding value (e.g. "UTF-8").
func (f *File) Encoding() string { return f.get(KeyEncoding) }

// DisplayName returns the VM's display name.
func (f *File) DisplayName() string { return f.get(KeyDisplayName) }

// NVRAM returns the nvram file name ("" when the key is absent; VMware
// then uses the .vmx base name with ".nvram").
func (f *File) NVRAM() string { return f.get(KeyNVRAM) }

// SwapDerivedName returns the swap file the VM last used (often an
// absolute datastore path).
func (f *File) SwapDerivedName() string { return f.get(KeySwapDerivedName) }

// CheckpointVMState returns the suspend state file (.vmss), if suspended.
func (f *File) CheckpointVMState() string { return f.get(KeyCheckpointVMState) }

// UUIDBios returns uuid.bios ("56 4d ... -..." form).
func (f *File) UUIDBios() string { return f.get(KeyUUIDBios) }

// VCUUID returns vc.uuid (set by vCenter).
func (f *File) VCUUID() string { return f.get(KeyVCUUID) }

// Disk is a virtual disk or CD/DVD slot: <bus><N>:<M>.fileName.
type Disk struct {
	Device     string // e.g. "scsi0:1"
	Bus        string // scsi, sata, ide or nvme
	FileName   string
	DeviceType string // e.g. "scsi-hardDisk", "cdrom-image"; often empty
	Present    bool   // <device>.present is TRUE
}

// IsHardDisk reports whether the slot holds a virtual disk rather than a
// CD/DVD image or device.
func (d Disk) IsHardDisk() bool {
	t := strings.ToLower(d.DeviceType)
	if strings.Contains(t, "cdrom") || strings.Contains(t, "floppy") {
		return false
	}
	return !strings.HasSuffix(strings.ToLower(d.FileName), ".iso")
}

var diskKey = regexp.MustCompile(`(?i)^(scsi|sata|ide|nvme)([0-9]+):([0-9]+)\.filename$`)

// Disks returns every <bus>N:M device that has a fileName, in file order.
func (f *File) Disks() []Disk {
	var out []Disk
	seen := map[string]bool{}
	for _, k := range f.Keys() {
		m := diskKey.FindStringSubmatch(k)
		if m == nil {
			continue
		}
		dev := strings.ToLower(m[1]) + m[2] + ":" + m[3]
		if seen[dev] {
			continue
		}
		seen[dev] = true
		out = append(out, Disk{
			Device:     dev,
			Bus:        strings.ToLower(m[1]),
			FileName:   f.get(dev + ".fileName"),
			DeviceType: f.get(dev + ".deviceType"),
			Present:    IsTrue(f.get(dev + ".present")),
		})
	}
	return out
}

// IsTrue interprets a VMware boolean ("TRUE", "true", "1", "yes").
func IsTrue(v string) bool {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "true", "1", "yes", "on":
		return true
	}
	return false
}

// Encrypted reports whether the VM carries a key safe.
func (f *File) Encrypted() bool { return f.get(KeyKeySafe) != "" }

// KeySafe parses encryption.keySafe with govmomi's KeyLocator codec; nil,
// nil when absent.
func (f *File) KeySafe() (*crypto.KeyLocator, error) {
	v := f.get(KeyKeySafe)
	if v == "" {
		return nil, nil
	}
	kl, err := keylocator.Parse(v)
	if err != nil {
		return nil, fmt.Errorf("vmx: %s: %w", KeyKeySafe, err)
	}
	return kl, nil
}

// SetKeySafe writes encryption.keySafe; nil removes it.
func (f *File) SetKeySafe(kl *crypto.KeyLocator) error {
	if kl == nil {
		f.Delete(KeyKeySafe)
		return nil
	}
	b, err := kl.MarshalText()
	if err != nil {
		return fmt.Errorf("vmx: %s: %w", KeyKeySafe, err)
	}
	return f.Set(KeyKeySafe, string(b))
}

// EncryptionData returns the encryption.data bundle (base64 text).
func (f *File) EncryptionData() (string, bool) { return f.Get(KeyEncryptionData) }

// SetEncryptionData writes encryption.data; "" removes it.
func (f *File) SetEncryptionData(b64 string) error {
	if b64 == "" {
		f.Delete(KeyEncryptionData)
		return nil
	}
	return f.Set(KeyEncryptionData, b64)
}

// Snapshot is one snapshotN.* group of a .vmsd file.
type Snapshot struct {
	Index       int
	UID         string
	DisplayName string
	FileName    string // the .vmsn file
	Parent      string // uid of the parent snapshot
	Disks       []SnapshotDisk
}

// SnapshotDisk is snapshotN.diskM.*: the disk as it was at the snapshot.
type SnapshotDisk struct {
	Node     string // device, e.g. "scsi0:0"
	FileName string // descriptor of the disk at that point
}

var snapKey = regexp.MustCompile(`(?i)^snapshot([0-9]+)\.(?:disk([0-9]+)\.)?([a-z]+)$`)

// Snapshots returns the snapshots of a .vmsd file in index order.
func (f *File) Snapshots() []Snapshot {
	byIdx := map[int]*Snapshot{}
	disks := map[int]map[int]*SnapshotDisk{}
	for _, k := range f.Keys() {
		m := snapKey.FindStringSubmatch(k)
		if m == nil {
			continue
		}
		n, err := strconv.Atoi(m[1])
		if err != nil || n > 1<<20 {
			continue
		}
		s := byIdx[n]
		if s == nil {
			s = &Snapshot{Index: n}
			byIdx[n] = s
		}
		v := f.get(k)
		if m[2] != "" {
			di, err := strconv.Atoi(m[2])
			if err != nil || di > 1<<20 {
				continue
			}
			if disks[n] == nil {
				disks[n] = map[int]*SnapshotDisk{}
			}
			d := disks[n][di]
			if d == nil {
				d = &SnapshotDisk{}
				disks[n][di] = d
			}
			switch strings.ToLower(m[3]) {
			case "filename":
				d.FileName = v
			case "node":
				d.Node = v
			}
			continue
		}
		switch strings.ToLower(m[3]) {
		case "uid":
			s.UID = v
		case "displayname":
			s.DisplayName = v
		case "filename":
			s.FileName = v
		case "parent":
			s.Parent = v
		}
	}
	var out []Snapshot
	for n, s := range byIdx {
		var idx []int
		for di := range disks[n] {
			idx = append(idx, di)
		}
		sort.Ints(idx)
		for _, di := range idx {
			s.Disks = append(s.Disks, *disks[n][di])
		}
		out = append(out, *s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out
}

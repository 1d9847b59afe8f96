package vm

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// VMStatus describes a VM's encryption as read from its files, without
// any key: which files are containers, which KEK wraps each DEK, the DEK
// fingerprints, logical sizes, and any interrupted conversion.
type VMStatus struct {
	Dir         string
	Name        string
	Encrypted   bool
	VMID        string
	Policy      string
	KEKs        []string // provider/key id of every KEK the VM needs
	Interrupted Op
	Snapshots   int
	Files       []FileStatus
	// Problems are one-line findings that need the admin's attention
	// but do not stop the VM from being used.
	Problems []string
}

// FileStatus is one data file.
type FileStatus struct {
	Name        string
	Kind        string
	Disk        string
	Encrypted   bool
	KEK         string
	Fingerprint string
	Size        int64
}

// ReadVMStatus reports dir's encryption state. corePatterns are extra
// core-dump file-name patterns (see VMOps.CoreDumpPatterns).
func ReadVMStatus(dir string, corePatterns []string) (*VMStatus, error) {
	l, err := LoadLayout(dir, corePatterns)
	if err != nil {
		return nil, err
	}
	st := &VMStatus{Dir: l.Dir, Encrypted: l.Encrypted, VMID: l.VMID, Policy: l.Policy, Snapshots: l.Snapshots, Files: []FileStatus{}, KEKs: []string{}}
	st.Name, _ = l.VMX.Get("displayName")
	if st.Policy == "" {
		st.Policy = PolicyDefault
	}
	if op, err := InterruptedOp(dir); err == nil && op != "" {
		st.Interrupted = op
	}
	keks := map[string]bool{}
	kekOf := func(ks string) string {
		entries, err := keys.DecodeKeySafe(ks)
		if err != nil || len(entries) == 0 {
			return ""
		}
		for _, e := range entries {
			keks[e.KEK.String()] = true
		}
		return entries[0].KEK.String()
	}
	vmKEK := ""
	if l.Encrypted {
		vmKEK = kekOf(l.KeySafe)
	}
	add := func(name, kind, diskName, kek string) {
		fs := FileStatus{Name: name, Kind: kind, Disk: diskName}
		f, err := safeopen.Open(filepath.Join(l.Dir, name), os.O_RDONLY)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				st.Problems = append(st.Problems, err.Error())
			}
			return
		}
		defer f.Close()
		region := make([]byte, container.HeaderSize)
		n, _ := io.ReadFull(f, region)
		if p := PlaceProblem(l, name, region[:n]); p != "" {
			st.Problems = append(st.Problems, fmt.Sprintf("%s: %s; views refuse it and conversions stop on it", name, p))
		}
		if h, err := container.PeekHeader(region[:n]); err == nil {
			fs.Encrypted, fs.Size, fs.KEK = true, h.Size, kek
			fs.Fingerprint = hex.EncodeToString(h.Fingerprint[:])
		} else if fi, err := f.Stat(); err == nil {
			fs.Size = fi.Size()
		}
		st.Files = append(st.Files, fs)
	}
	for _, d := range l.Disks {
		kek := ""
		if d.KeySafe != "" {
			kek = kekOf(d.KeySafe)
		}
		if d.KeySafe != "" && d.DiskID == "" && !d.Embedded {
			st.Problems = append(st.Problems, fmt.Sprintf("disk %s: its descriptor has encryptionKeys but no %s line; VM operations refuse it. "+
				"To restore it from the extents' keySafe copy: vmcryptd disk restore-keys %s %s", d.Name, DDBDiskID, l.Dir, d.Name))
		}
		if d.KeySafe == "" && !d.Embedded && st.Interrupted == "" {
			if b, _, ok := ExtentCopies(l.Dir, d); ok {
				st.Problems = append(st.Problems, fmt.Sprintf("disk %s: its descriptor has no encryptionKeys, but its extents are encrypted containers of disk %s: "+
					"a descriptor that lost its key lines, or guest data that looks like one; views refuse it (EACCES). "+
					"If the disk was encrypted: vmcryptd disk restore-keys %s %s", d.Name, b.OwnerID, l.Dir, d.Name))
			}
		}
		for _, e := range d.Extents {
			add(e, container.KindExtent.String(), d.Name, kek)
		}
	}
	for _, f := range l.Files {
		add(f.Name, f.Kind.String(), "", vmKEK)
	}
	for _, c := range l.CoreDumps {
		kek := ""
		if ks, ok, _ := container.ReadEmbeddedKeySafeFile(filepath.Join(l.Dir, c)); ok {
			if e, err := keys.DecodeKeySafe(ks); err == nil {
				kek = e[0].KEK.String() // the host key: not one the VM needs
			}
		}
		add(c, container.KindCoreDump.String(), "", kek)
	}
	for k := range keks {
		st.KEKs = append(st.KEKs, k)
	}
	sort.Strings(st.KEKs)
	return st, nil
}

// KEKRefs parses "provider/key id" strings back into KeyRefs.
func KEKRefs(s []string) []keys.KeyRef {
	var out []keys.KeyRef
	for _, x := range s {
		for i := 0; i < len(x); i++ {
			if x[i] == '/' {
				out = append(out, keys.KeyRef{Provider: x[:i], KeyID: x[i+1:]})
				break
			}
		}
	}
	return out
}

// ContainerInfo is what a container header says without any key, for
// `vmcryptd inspect`.
type ContainerInfo struct {
	FormatVersion int      `json:"format_version"`
	Kind          string   `json:"kind"`
	LogicalSize   int64    `json:"logical_size"`
	UnitSize      int      `json:"unit_size"`
	KeyPurpose    string   `json:"key_purpose"`
	KeyOwner      string   `json:"key_owner"`
	Fingerprint   string   `json:"dek_fingerprint"`
	FileID        string   `json:"file_id"`
	Sequence      uint64   `json:"header_sequence"`
	EmbeddedKEKs  []string `json:"embedded_keysafe_keks,omitempty"`
}

// String is the one-line form `vmcryptd inspect` prints.
func (ci ContainerInfo) String() string {
	s := fmt.Sprintf("format %d, kind %s, logical size %d, unit %d, key %s/%s, DEK fingerprint %s, file id %s, header sequence %d",
		ci.FormatVersion, ci.Kind, ci.LogicalSize, ci.UnitSize, ci.KeyPurpose, ci.KeyOwner, ci.Fingerprint, ci.FileID, ci.Sequence)
	if len(ci.EmbeddedKEKs) > 0 {
		s += fmt.Sprintf(", keySafe copy in header wrapped by %s", strings.Join(ci.EmbeddedKEKs, " "))
	}
	return s
}

// DetectContainer recognises a container from its first bytes (no key:
// the header is reported unauthenticated).
func DetectContainer(head []byte) (any, bool) {
	h, err := container.PeekHeader(head)
	if err != nil {
		return nil, false
	}
	ci := ContainerInfo{FormatVersion: container.ContainerVersion, Kind: h.Kind.String(), LogicalSize: h.Size, UnitSize: h.UnitSize,
		KeyPurpose: string(h.Binding.Purpose), KeyOwner: h.Binding.OwnerID,
		Fingerprint: hex.EncodeToString(h.Fingerprint[:]), FileID: hex.EncodeToString(h.FileID[:]), Sequence: h.Seq}
	if ks, ok := container.ReadEmbeddedKeySafe(head); ok {
		if entries, err := keys.DecodeKeySafe(ks); err == nil {
			for _, e := range entries {
				ci.EmbeddedKEKs = append(ci.EmbeddedKEKs, e.KEK.String())
			}
		}
	}
	return ci, true
}

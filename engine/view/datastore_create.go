package view

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/vmdir"
)

// Placing new files: what the view creates inside an encrypted VM, and
// whether it would.

// vmxNamedKind is the kind of a VM-key file the vmx beside path names
// with a name of its own (nvram = "firmware.bin"), so that the view
// creates it as the container its place requires; 0 otherwise (and when
// the directory's vmx cannot be read: such a VM's files are refused
// anyway).
func (d *Datastore) vmxNamedKind(path string) container.Kind {
	l, err := d.placementLayout(filepath.Dir(path))
	if err != nil || l == nil || !l.Encrypted {
		return 0
	}
	name := filepath.Base(path)
	if st := l.VMX.CheckpointVMState(); st != "" && filepath.Base(st) == name {
		return vm.KindFromDir[vmdir.CheckpointKind(st)]
	}
	for _, ref := range []struct {
		v string
		k container.Kind
	}{{l.VMX.NVRAM(), container.KindNVRAM}, {l.VMX.SwapDerivedName(), container.KindVSWP}} {
		if ref.v != "" && filepath.Base(ref.v) == name {
			return ref.k
		}
	}
	return 0
}

// Create makes a new file for the view: inside an encrypted VM's
// directory, the VM-key kinds (nvram, swap, snapshot and suspend state,
// memory) are created as containers under the VM DEK, and .vmdk files as
// containers of a disk (a new one, or the encrypted disk whose extent the
// name says it is; see viewdisk.go). Everything else is plain, and so is
// every file outside encrypted VMs.
func (d *Datastore) Create(rel string, perm os.FileMode) (*container.Container, bool, error) {
	path, err := d.abs(rel)
	if err != nil {
		return nil, false, err
	}
	if err := d.busy(path); err != nil {
		return nil, false, err
	}
	kind := vm.KindByName(path)
	if kind == 0 && !vm.IsVMDKName(path) {
		kind = d.vmxNamedKind(path)
		if kind == 0 {
			return nil, false, nil
		}
	}
	l, err := d.placementLayout(filepath.Dir(path))
	if err != nil {
		return nil, false, err
	}
	if l == nil || !l.Encrypted {
		return nil, false, nil // not a VM directory, or a plain VM
	}
	if err := d.WritableUnder(l.KeySafe); err != nil { // revoked KEK: read-only
		return nil, false, fmt.Errorf("%s: %w", path, err)
	}
	perm = vm.EncryptedFilePerm(perm)
	if kind == 0 {
		return d.createDiskFile(l, path, perm)
	}
	b := keys.Binding{Purpose: keys.PurposeVM, OwnerID: l.VMID}
	dek, err := d.cachedDEK(l.Dir, b, l.KeySafe)
	if err != nil {
		return nil, false, err
	}
	c, err := container.CreateContainer(path, dek, container.CreateOptions{Kind: kind, Binding: b, Impl: d.impl, Perm: perm})
	if err != nil {
		return nil, false, err
	}
	return c, true, nil
}

// WouldEncrypt reports whether Create(rel) would make a container.
func (d *Datastore) WouldEncrypt(rel string) (bool, error) {
	path, err := d.abs(rel)
	if err != nil {
		return false, err
	}
	if vm.KindByName(path) == 0 && !vm.IsVMDKName(path) && d.vmxNamedKind(path) == 0 {
		return false, nil
	}
	l, err := d.placementLayout(filepath.Dir(path))
	if err != nil {
		return false, err
	}
	if l == nil || !l.Encrypted {
		return false, nil
	}
	if vm.IsVMDKName(path) {
		// Replacing an existing file keeps its form (so `sed -i` on a
		// plain descriptor works through the view).
		if st, err := os.Lstat(path); err == nil && st.Mode().IsRegular() {
			fs, _, err := d.Classify(rel)
			return err == nil && fs != FilePlain, nil
		}
		desc, _ := vm.DescriptorName(filepath.Base(path))
		for _, dk := range l.Disks {
			if dk.Name == desc && !dk.Embedded && dk.KeySafe == "" {
				return false, nil // an extent of a plain disk
			}
		}
	}
	return true, nil
}

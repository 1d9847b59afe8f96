package vmops

import (
	"bytes"
	"fmt"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// The VM's text files during conversions: descriptors' key lines and the
// vmx's encryption lines.

// writeDescriptors sets (or, for decrypt, removes) the encryption lines of
// every text descriptor.
func (o *VMOps) writeDescriptors(l *vm.Layout, disks []vm.JournalDisk, encrypt bool, w vm.TextWriter) error {
	for _, jd := range disks {
		var d *vm.Disk
		for _, x := range l.Disks {
			if x.Name == jd.Name {
				d = x
			}
		}
		if d == nil || d.Embedded {
			continue
		}
		err := editDescriptorWith(filepath.Join(l.Dir, d.Name), func(desc *vmdk.Descriptor) error {
			if !encrypt {
				desc.Delete(vm.DescKeySafe)
				desc.Delete(vm.DDBDiskID)
				return nil
			}
			return vm.SetKeyLines(desc, jd.KeySafe, jd.DiskID)
		}, w)
		if err != nil {
			return err
		}
	}
	return nil
}

// EditDescriptor rewrites the text descriptor at path, atomically, with
// edit's changes.
func EditDescriptor(path string, edit func(*vmdk.Descriptor) error) error {
	return editDescriptorWith(path, edit, vm.WriteText)
}

// editDescriptorWith is editDescriptor writing with w.
func editDescriptorWith(path string, edit func(*vmdk.Descriptor) error, w vm.TextWriter) error {
	raw, err := safeopen.ReadFile(path, vm.MaxDescriptor)
	if err != nil {
		return err
	}
	desc, err := vmdk.ParseDescriptor(raw)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := edit(desc); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return w(path, desc.Bytes())
}

// writeEncryptedVMX moves the sensitive lines into encryption.data and
// adds the key lines. Skipped when the vmx already carries this keySafe
// (a resumed conversion that got this far).
func (o *VMOps) writeEncryptedVMX(l *vm.Layout, j *vm.Journal, vmDEK *keys.DEK) error {
	if cur, _ := l.VMX.Get(vm.VMXKeySafe); cur == j.KeySafe {
		return nil
	}
	rest, moved := vmx.ExtractSensitive(l.VMXText)
	cfg, err := vmx.Parse(rest)
	if err != nil {
		return fmt.Errorf("%s: %w", l.VMXPath, err)
	}
	set := func(k, v string) {
		if err == nil {
			err = cfg.Set(k, v)
		}
	}
	set(vm.VMXVMID, j.VMID)
	set(vm.VMXKeySafe, j.KeySafe)
	if len(moved) > 0 {
		data, serr := container.SealVMXData(vmDEK, j.VMID, moved)
		if serr != nil {
			return serr
		}
		set(vm.VMXData, data)
	}
	policy := j.Policy
	if policy == "" {
		policy = vm.PolicyEncrypt
	}
	set(vm.VMXPolicy, policy)
	if err != nil {
		return fmt.Errorf("%s: %w", l.VMXPath, err)
	}
	out := cfg.Bytes()
	// Keep the file's final-newline convention: appending must not add a
	// newline that decryption (which deletes the appended lines) could not
	// tell from an original one.
	if len(l.VMXText) > 0 && !bytes.HasSuffix(l.VMXText, []byte("\n")) {
		out = bytes.TrimSuffix(out, []byte("\n"))
	}
	return j.WriteText(l.Dir)(l.VMXPath, out)
}

func (o *VMOps) writePlainVMX(l *vm.Layout, j *vm.Journal, vmDEK *keys.DEK) error {
	var moved []vmx.MovedLine
	if data, ok := l.VMX.Get(vm.VMXData); ok && data != "" {
		var err error
		if moved, err = container.OpenVMXData(vmDEK, j.VMID, data); err != nil {
			return fmt.Errorf("%s: %w", l.VMXPath, err)
		}
	}
	for _, k := range []string{vm.VMXVMID, vm.VMXKeySafe, vm.VMXData, vm.VMXPolicy} {
		l.VMX.Delete(k)
	}
	return j.WriteText(l.Dir)(l.VMXPath, vmx.RestoreSensitive(l.VMX.Bytes(), moved))
}

// rekeyVMX moves the vmx's encryption.data bundle (if any) from the VM
// DEK from to the VM DEK to, sets encryption.keySafe to ks and writes the
// vmx with write: the vmx step of a deep rekey, and of its abort.
func rekeyVMX(l *vm.Layout, vmID string, from, to *keys.DEK, ks string, write vm.TextWriter) error {
	if data, ok := l.VMX.Get(vm.VMXData); ok && data != "" {
		moved, err := container.OpenVMXData(from, vmID, data)
		if err != nil {
			return fmt.Errorf("%s: %w", l.VMXPath, err)
		}
		sealed, err := container.SealVMXData(to, vmID, moved)
		if err != nil {
			return err
		}
		if err := l.VMX.Set(vm.VMXData, sealed); err != nil {
			return err
		}
	}
	if err := l.VMX.Set(vm.VMXKeySafe, ks); err != nil {
		return err
	}
	return write(l.VMXPath, l.VMX.Bytes())
}

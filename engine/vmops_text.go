package engine

import (
	"bytes"
	"fmt"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// The VM's text files during conversions: descriptors' key lines and the
// vmx's encryption lines.

// writeDescriptors sets (or, for decrypt, removes) the encryption lines of
// every text descriptor.
func (o *VMOps) writeDescriptors(l *vmLayout, disks []journalDisk, encrypt bool, w textWriter) error {
	for _, jd := range disks {
		var d *disk
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
				desc.Delete(DescKeySafe)
				desc.Delete(DDBDiskID)
				return nil
			}
			return setKeyLines(desc, jd.KeySafe, jd.DiskID)
		}, w)
		if err != nil {
			return err
		}
	}
	return nil
}

// editDescriptor rewrites the text descriptor at path, atomically, with
// edit's changes.
func editDescriptor(path string, edit func(*vmdk.Descriptor) error) error {
	return editDescriptorWith(path, edit, writeText)
}

// editDescriptorWith is editDescriptor writing with w.
func editDescriptorWith(path string, edit func(*vmdk.Descriptor) error, w textWriter) error {
	raw, err := safeopen.ReadFile(path, maxDescriptor)
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
func (o *VMOps) writeEncryptedVMX(l *vmLayout, j *journal, vmDEK *DEK) error {
	if cur, _ := l.VMX.Get(VMXKeySafe); cur == j.KeySafe {
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
	set(VMXVMID, j.VMID)
	set(VMXKeySafe, j.KeySafe)
	if len(moved) > 0 {
		data, serr := sealVMXData(vmDEK, j.VMID, moved)
		if serr != nil {
			return serr
		}
		set(VMXData, data)
	}
	policy := j.Policy
	if policy == "" {
		policy = PolicyEncrypt
	}
	set(VMXPolicy, policy)
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
	return j.writeText(l.Dir)(l.VMXPath, out)
}

func (o *VMOps) writePlainVMX(l *vmLayout, j *journal, vmDEK *DEK) error {
	var moved []vmx.MovedLine
	if data, ok := l.VMX.Get(VMXData); ok && data != "" {
		var err error
		if moved, err = openVMXData(vmDEK, j.VMID, data); err != nil {
			return fmt.Errorf("%s: %w", l.VMXPath, err)
		}
	}
	for _, k := range []string{VMXVMID, VMXKeySafe, VMXData, VMXPolicy} {
		l.VMX.Delete(k)
	}
	return j.writeText(l.Dir)(l.VMXPath, vmx.RestoreSensitive(l.VMX.Bytes(), moved))
}

// rekeyVMX moves the vmx's encryption.data bundle (if any) from the VM
// DEK from to the VM DEK to, sets encryption.keySafe to ks and writes the
// vmx with write: the vmx step of a deep rekey, and of its abort.
func rekeyVMX(l *vmLayout, vmID string, from, to *DEK, ks string, write textWriter) error {
	if data, ok := l.VMX.Get(VMXData); ok && data != "" {
		moved, err := openVMXData(from, vmID, data)
		if err != nil {
			return fmt.Errorf("%s: %w", l.VMXPath, err)
		}
		sealed, err := sealVMXData(to, vmID, moved)
		if err != nil {
			return err
		}
		if err := l.VMX.Set(VMXData, sealed); err != nil {
			return err
		}
	}
	if err := l.VMX.Set(VMXKeySafe, ks); err != nil {
		return err
	}
	return write(l.VMXPath, l.VMX.Bytes())
}

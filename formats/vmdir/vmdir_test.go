package vmdir

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/formats/vmdk"
)

// sparseWithDescriptor builds a minimal monolithicSparse file: header,
// embedded descriptor, an empty grain directory and table.
func sparseWithDescriptor(t *testing.T, desc string) []byte {
	t.Helper()
	h := vmdk.SparseHeader{Version: 1, Flags: 3, Capacity: 2048, GrainSize: 128, NumGTEsPerGT: 512,
		DescriptorOffset: 1, DescriptorSize: 4, RGDOffset: 5, GDOffset: 10, OverHead: 16,
		SingleEndLineChar: '\n', NonEndLineChar: ' ', DoubleEndLineChar1: '\r', DoubleEndLineChar2: '\n'}
	b, _ := h.MarshalBinary()
	img := make([]byte, 16*512)
	copy(img, b)
	copy(img[512:], desc)
	return img
}

func flatDesc(extents ...string) string {
	s := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\n"
	for _, e := range extents {
		s += "RW 8 FLAT \"" + e + "\" 0\n"
	}
	return s + "\nddb.adapterType = \"lsilogic\"\n"
}

func TestScan(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"web.vmx": `.encoding = "UTF-8"
displayName = "web"
nvram = "web.nvram"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web-000001.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "data.vmdk"
sata0:0.deviceType = "cdrom-image"
sata0:0.fileName = "/vmfs/volumes/iso/x.iso"
scsi0:2.fileName = "gone.vmdk"
scsi0:3.fileName = "../escape.vmdk"
sched.swap.derivedName = "/vmfs/volumes/5f1e/web/web-5c1f3a.vswp"
checkpoint.vmState = "web-abc.vmss"
`,
		"web.vmsd": `snapshot0.uid = "1"
snapshot0.filename = "web-Snapshot1.vmsn"
snapshot0.numDisks = "1"
snapshot0.disk0.fileName = "web.vmdk"
snapshot0.disk0.node = "scsi0:0"
`,
		"web.vmdk":             flatDesc("web-flat.vmdk"),
		"web-flat.vmdk":        strings.Repeat("\x00", 4096),
		"web-000001.vmdk":      "# Disk DescriptorFile\nversion=1\nCID=00000002\nparentCID=fffffffe\ncreateType=\"monolithicFlat\"\nparentFileNameHint=\"web.vmdk\"\nRW 8 FLAT \"web-000001-flat.vmdk\" 0\n",
		"web-000001-flat.vmdk": strings.Repeat("\x00", 4096),
		"data.vmdk":            string(sparseWithDescriptor(t, "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"data.vmdk\"\n")),
		"web.nvram":            "MRVN\x01\x00\x00\x00",
		"web-5c1f3a.vswp":      "swap",
		"web-abc.vmss":         "suspend",
		"web-abc.vmem":         "memory",
		"web-Snapshot1.vmsn":   "snap",
		"orphan.vmsn":          "old snap",
		"vmware.log":           "log",
		"vmware-1.log":         "log",
		"vmx-zdump.zdump":      "dump",
		"vmware-vmx-1234.core": "dump",
		"core.5678":            "dump",
		"stale.vmdk":           flatDesc("stale-flat.vmdk"),
		"stale-flat.vmdk":      "\x00\x00",
		"notes.txt":            "hello",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.Mkdir(filepath.Join(dir, "web.vmx.lck"), 0o755)
	d, err := Scan(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct {
		kind Kind
		ref  bool
		disk string
	}{
		"web.vmx":              {KindConfig, true, ""},
		"web.vmsd":             {KindVMSD, true, ""},
		"web.vmdk":             {KindDescriptor, true, "web.vmdk"},
		"web-flat.vmdk":        {KindExtent, true, "web.vmdk"},
		"web-000001.vmdk":      {KindDescriptor, true, "web-000001.vmdk"},
		"web-000001-flat.vmdk": {KindExtent, true, "web-000001.vmdk"},
		"data.vmdk":            {KindExtent, true, "data.vmdk"},
		"web.nvram":            {KindNVRAM, true, ""},
		"web-5c1f3a.vswp":      {KindVSwap, true, ""},
		"web-abc.vmss":         {KindVMSS, true, ""},
		"web-abc.vmem":         {KindVMEM, false, ""},
		"web-Snapshot1.vmsn":   {KindVMSN, true, ""},
		"orphan.vmsn":          {KindVMSN, false, ""},
		"vmware.log":           {KindLog, false, ""},
		"vmware-1.log":         {KindLog, false, ""},
		"vmx-zdump.zdump":      {KindCoreDump, false, ""},
		"vmware-vmx-1234.core": {KindCoreDump, false, ""},
		"core.5678":            {KindCoreDump, false, ""},
		"stale.vmdk":           {KindDescriptor, false, ""},
		"stale-flat.vmdk":      {KindExtent, false, ""},
		"notes.txt":            {KindUnknown, false, ""},
	}
	if len(d.Files) != len(want) {
		t.Errorf("%d files, want %d: %+v", len(d.Files), len(want), d.Files)
	}
	for _, f := range d.Files {
		w, ok := want[f.Name]
		if !ok {
			t.Errorf("unexpected file %s", f.Name)
			continue
		}
		if f.Kind != w.kind || f.Referenced != w.ref || f.Disk != w.disk {
			t.Errorf("%s: kind %s referenced %v disk %q; want %s %v %q", f.Name, f.Kind, f.Referenced, f.Disk, w.kind, w.ref, w.disk)
		}
	}
	if f, _ := d.Lookup("data.vmdk"); !f.Embedded {
		t.Error("data.vmdk not marked embedded")
	}
	if strings.Join(d.Missing, ",") != "gone.vmdk" {
		t.Errorf("Missing = %v", d.Missing)
	}
	if len(d.Problems) != 1 || !strings.Contains(d.Problems[0], "escape.vmdk") {
		t.Errorf("Problems = %v", d.Problems)
	}
	if n := len(d.Unreferenced()); n != 10 {
		t.Errorf("%d unreferenced files", n)
	}
}

func TestFindVMX(t *testing.T) {
	dir := t.TempDir()
	if _, err := FindVMX(dir); err == nil || !strings.Contains(err.Error(), "no .vmx") {
		t.Errorf("empty dir: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "a.vmx"), nil, 0o644)
	os.WriteFile(filepath.Join(dir, "a.vmx~"), nil, 0o644)
	if p, err := FindVMX(dir); err != nil || filepath.Base(p) != "a.vmx" {
		t.Errorf("FindVMX = %q, %v", p, err)
	}
	os.WriteFile(filepath.Join(dir, "b.VMX"), nil, 0o644)
	if _, err := FindVMX(dir); err == nil || !strings.Contains(err.Error(), "several") {
		t.Errorf("two vmx: %v", err)
	}
}

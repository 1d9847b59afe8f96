package inspect

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/formats/nvram"
)

func needQemu(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("qemu-img not found in CI (install qemu-utils): %v", err)
		}
		t.Skip("qemu-img not found; install qemu-utils to run this test")
	}
}

func run(t *testing.T, dir, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return out
}

// jsonMap round-trips a report through JSON, as the CLI's --json does.
func jsonMap(t *testing.T, r *Report) map[string]any {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestVMDKAgreesWithQemu checks format and virtual size against
// "qemu-img info --output=json" for every subformat.
func TestVMDKAgreesWithQemu(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	for _, tc := range []struct{ sub, size string }{
		{"monolithicSparse", "64M"},
		{"monolithicFlat", "1049088"}, // 1 MiB + 1 sector
		{"twoGbMaxExtentSparse", "5G"},
		{"twoGbMaxExtentFlat", "5G"},
		{"streamOptimized", "100M"},
	} {
		t.Run(tc.sub, func(t *testing.T) {
			file := tc.sub + ".vmdk"
			run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+tc.sub, file, tc.size)
			var info struct {
				VirtualSize    int64  `json:"virtual-size"`
				Format         string `json:"format"`
				FormatSpecific struct {
					Data struct {
						CreateType string `json:"create-type"`
						Extents    []struct {
							Filename    string `json:"filename"`
							VirtualSize int64  `json:"virtual-size"`
							ClusterSize int64  `json:"cluster-size"`
						} `json:"extents"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			if err := json.Unmarshal(run(t, dir, "qemu-img", "info", "--output=json", file), &info); err != nil {
				t.Fatal(err)
			}
			r, err := Inspect(filepath.Join(dir, file))
			if err != nil {
				t.Fatal(err)
			}
			m := jsonMap(t, r)
			if m["kind"] != info.Format || m["subformat"] != info.FormatSpecific.Data.CreateType || int64(m["virtual_size"].(float64)) != info.VirtualSize {
				t.Errorf("inspect kind=%v subformat=%v virtual_size=%v; qemu %s %s %d", m["kind"], m["subformat"], m["virtual_size"], info.Format, info.FormatSpecific.Data.CreateType, info.VirtualSize)
			}
			if m["encrypted_container"] != false {
				t.Errorf("encrypted_container = %v", m["encrypted_container"])
			}
			if len(r.Extents) != len(info.FormatSpecific.Data.Extents) {
				t.Fatalf("%d extents, qemu lists %d", len(r.Extents), len(info.FormatSpecific.Data.Extents))
			}
			exts := m["extents"].([]any)
			for i, q := range info.FormatSpecific.Data.Extents {
				e := exts[i].(map[string]any)
				if filepath.Base(e["path"].(string)) != filepath.Base(q.Filename) {
					t.Errorf("extent %d path %v, qemu %s", i, e["path"], q.Filename)
				}
				if int64(e["sectors"].(float64))*512 != q.VirtualSize {
					t.Errorf("extent %d sectors %v, qemu size %d", i, e["sectors"], q.VirtualSize)
				}
				if _, ok := e["type"].(string); !ok {
					t.Errorf("extent %d has no type", i)
				}
				if strings.Contains(tc.sub, "Sparse") || tc.sub == "streamOptimized" {
					if int64(e["grain_size"].(float64)) != q.ClusterSize {
						t.Errorf("extent %d grain_size %v, qemu cluster-size %d", i, e["grain_size"], q.ClusterSize)
					}
				}
				if _, ok := e["allocated_bytes"]; !ok {
					t.Errorf("extent %d lacks allocated_bytes", i)
				}
			}
			var text bytes.Buffer
			if err := r.WriteText(&text); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(text.String(), "vmdk ("+tc.sub+")") || !strings.Contains(text.String(), "extents:") {
				t.Errorf("text output:\n%s", text.String())
			}
		})
	}
}

const keySafe = "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/lab%2dkms/key%2d42,HMAC%2dSHA%2d256,AAECAw%3d%3d))"

func TestNVRAMAndVMX(t *testing.T) {
	dir := t.TempDir()
	img, err := nvram.New(0, nil)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "vm.nvram"), img, 0o644)
	r, err := Inspect(filepath.Join(dir, "vm.nvram"))
	if err != nil {
		t.Fatal(err)
	}
	m := jsonMap(t, r)
	nv := m["nvram"].(map[string]any)
	vars := nv["uefi_variables"].([]any)
	if m["kind"] != "nvram" || len(vars) != 3 || r.Size != nvram.DefaultSize {
		t.Fatalf("nvram report %v", m)
	}
	v0 := vars[0].(map[string]any)
	if v0["name"] != "Lang" || v0["guid"] != "8be4df61-93ca-11d2-aa0d-00e098032b8c" || v0["attributes"].(float64) != 7 || v0["size"].(float64) != 4 {
		t.Errorf("variable %v", v0)
	}

	vmxText := ".encoding = \"UTF-8\"\ndisplayName = \"db |22main|22\"\nencryption.keySafe = \"" + keySafe + "\"\nencryption.data = \"QUJD\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"vm.vmdk\"\n"
	os.WriteFile(filepath.Join(dir, "vm.vmx"), []byte(vmxText), 0o644)
	r, err = Inspect(filepath.Join(dir, "vm.vmx"))
	if err != nil {
		t.Fatal(err)
	}
	m = jsonMap(t, r)
	if m["kind"] != "vmx" || m["display_name"] != `db "main"` || m["encrypted"] != true {
		t.Errorf("vmx report %v", m)
	}
	keys := m["key_ids"].([]any)
	k := keys[0].(map[string]any)
	if len(keys) != 1 || k["provider_id"] != "lab-kms" || k["key_id"] != "key-42" || k["mac"] != "HMAC-SHA-256" {
		t.Errorf("key ids %v", keys)
	}
	var text bytes.Buffer
	r.WriteText(&text)
	if !strings.Contains(text.String(), "provider lab-kms key key-42") {
		t.Errorf("text:\n%s", text.String())
	}
}

func TestDirectoryAndDetector(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "vm.vmdk", "1M")
	os.WriteFile(filepath.Join(dir, "vm.vmx"), []byte("displayName = \"vm\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"vm.vmdk\"\n"), 0o644)
	img, _ := nvram.New(0, nil)
	os.WriteFile(filepath.Join(dir, "vm.nvram"), img, 0o644)
	os.WriteFile(filepath.Join(dir, "vmware.log"), []byte("log\n"), 0o644)

	r, err := Inspect(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := jsonMap(t, r)
	if m["kind"] != "directory" || m["vmx"] != "vm.vmx" || m["display_name"] != "vm" || m["encrypted"] != false {
		t.Errorf("directory report %v", m)
	}
	kinds := map[string]string{}
	for _, f := range m["files"].([]any) {
		f := f.(map[string]any)
		kinds[f["name"].(string)] = f["kind"].(string)
	}
	want := map[string]string{"vm.vmx": "config", "vm.vmdk": "descriptor", "vm-flat.vmdk": "extent", "vm.nvram": "nvram", "vmware.log": "log"}
	for n, k := range want {
		if kinds[n] != k {
			t.Errorf("%s: kind %q, want %q", n, kinds[n], k)
		}
	}

	// The container hook: pretend the flat extent is encrypted.
	os.WriteFile(filepath.Join(dir, "vm-flat.vmdk"), append([]byte("VMCRYPT0"), make([]byte, 1<<20-8)...), 0o644)
	det := func(h []byte) (any, bool) {
		if bytes.HasPrefix(h, []byte("VMCRYPT0")) {
			return map[string]string{"format": "test"}, true
		}
		return nil, false
	}
	r, err = InspectWith(filepath.Join(dir, "vm-flat.vmdk"), Options{Detector: det})
	if err != nil {
		t.Fatal(err)
	}
	if !r.EncryptedContainer || r.Container == nil || r.Kind != KindExtent {
		t.Errorf("container not detected: %+v", r)
	}
	r, err = InspectWith(filepath.Join(dir, "vm.vmdk"), Options{Detector: det})
	if err != nil || r.EncryptedContainer || len(r.Extents) != 1 || !r.Extents[0].EncryptedContainer {
		t.Errorf("descriptor with encrypted extent: %+v %v", r, err)
	}
	r, _ = InspectWith(dir, Options{Detector: det})
	for _, f := range r.Files {
		if f.EncryptedContainer != (f.Name == "vm-flat.vmdk") {
			t.Errorf("%s: encrypted_container %v", f.Name, f.EncryptedContainer)
		}
	}
	var text bytes.Buffer
	r.WriteText(&text)
	if !strings.Contains(text.String(), "vm-flat.vmdk") || !strings.Contains(text.String(), "encrypted") {
		t.Errorf("text:\n%s", text.String())
	}
}

func TestMissingExtentIsAWarning(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "d.vmdk"), []byte("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 2048 VMFS \"d-flat.vmdk\"\n"), 0o644)
	r, err := Inspect(filepath.Join(dir, "d.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Kind != KindVMDK || r.Subformat != "vmfs" || r.VirtualSize != 2048*512 || len(r.Warnings) != 1 {
		t.Errorf("report %+v", r)
	}
}

func TestCorruptSparseIsAnError(t *testing.T) {
	dir := t.TempDir()
	b := make([]byte, 1024)
	copy(b, "KDMV\x01\x00\x00\x00")
	os.WriteFile(filepath.Join(dir, "bad.vmdk"), b, 0o644)
	_, err := Inspect(filepath.Join(dir, "bad.vmdk"))
	if err == nil || !strings.Contains(err.Error(), "bad.vmdk") {
		t.Errorf("err = %v", err)
	}
}

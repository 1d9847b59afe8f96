package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

// flipLiveMAC flips one byte of the MAC of the header slot holding the
// highest sequence number (slot 0 when both are equal), as a stray write
// or a bad sector would.
func flipLiveMAC(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, 511); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x20
	if _, err := f.WriteAt(b, 511); err != nil {
		t.Fatal(err)
	}
}

// Issue 11 case 1: one flipped byte of the live header slot of an
// encrypted flat disk. The view keeps serving every byte (read-only), vm
// status and vm check report it, decrypt refuses it naming the file and
// changes nothing, vm check --repair fixes it, and afterwards decrypt
// gives back the data.
func TestCheckDamagedHeaderSlot(t *testing.T) {
	needView(t)
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "slotvm")
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "slotvm", "--disk", "64M", "--encrypt")
	extents, _ := filepath.Glob(filepath.Join(vm, "*-flat.vmdk"))
	if len(extents) != 1 {
		t.Fatalf("flat extents: %v", extents)
	}
	extent := extents[0]
	desc := strings.TrimSuffix(extent, "-flat.vmdk") + ".vmdk"
	mp := filepath.Join(dir, "view")
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	t.Cleanup(func() { vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp) })
	viewDesc := filepath.Join(mp, "slotvm", filepath.Base(desc))
	runCmd(t, mp, "qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 1M 4M", viewDesc)
	mustRun(t, "--socket", sock, "unmount", mp)
	r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "check", vm)
	if r.code != 0 {
		t.Fatalf("check of a healthy VM: %d %s %s", r.code, r.out, r.err)
	}

	flipLiveMAC(t, extent)
	before, _ := os.ReadFile(extent)

	// The view serves all 64 MiB, read-only.
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	viewExtent := filepath.Join(mp, "slotvm", filepath.Base(extent))
	if st, err := os.Stat(viewExtent); err != nil || st.Size() != 64<<20 {
		t.Fatalf("view size: %v %v", st, err)
	}
	runCmd(t, mp, "qemu-io", "-r", "-f", "vmdk", "-c", "read -P 0x5a 1M 4M", "-c", "read -P 0 0 1M", viewDesc)
	if f, err := os.OpenFile(viewExtent, os.O_WRONLY, 0); err == nil {
		f.Close()
		t.Fatal("a degraded container opened for writing through the view")
	}
	mustRun(t, "--socket", sock, "unmount", mp)

	// status and check report it; decrypt refuses, naming the file, and
	// changes nothing.
	var st api.VMStatusReply
	if err := json.Unmarshal([]byte(mustRun(t, "--socket", sock, "vm", "status", vm, "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(st.Problems, "\n"), "degraded") {
		t.Fatalf("vm status problems: %q", st.Problems)
	}
	r = vmcryptd(t, nil, nil, "--socket", sock, "vm", "check", vm)
	if r.code != exitProblems || !strings.Contains(r.out, filepath.Base(extent)) || !strings.Contains(r.out, "degraded") {
		t.Fatalf("check: %d %q %q", r.code, r.out, r.err)
	}
	r = vmcryptd(t, nil, nil, "--socket", sock, "vm", "decrypt", vm)
	if r.code == 0 || !strings.Contains(r.err, filepath.Base(extent)) {
		t.Fatalf("decrypt of a degraded disk: %d %q", r.code, r.err)
	}
	if after, _ := os.ReadFile(extent); !bytes.Equal(before, after) {
		t.Fatal("the refused decrypt changed the extent")
	}
	if _, err := os.Stat(desc); err != nil {
		t.Fatal(err)
	}

	// --repair mirrors the good slot; then everything works again.
	r = vmcryptd(t, nil, nil, "--socket", sock, "vm", "check", "--repair", vm)
	if r.code != 0 || !strings.Contains(r.out, "repaired") {
		t.Fatalf("check --repair: %d %q %q", r.code, r.out, r.err)
	}
	mustRun(t, "--socket", sock, "vm", "decrypt", vm)
	runCmd(t, vm, "qemu-io", "-r", "-f", "vmdk", "-c", "read -P 0x5a 1M 4M", "-c", "read -P 0 5M 59M", desc)
	if st, err := os.Stat(extent); err != nil || st.Size() != 64<<20 {
		t.Fatalf("decrypted extent: %v %v", st, err)
	}
}

// Issue 11 case 2 through vm check: a descriptor that lost its key lines
// is found, and --repair restores them from the extents' keySafe copy.
func TestCheckRestoresLostKeyLines(t *testing.T) {
	needView(t)
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "linesvm")
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "linesvm", "--disk", "16M", "--encrypt")
	descs, _ := filepath.Glob(filepath.Join(vm, "*.vmdk"))
	var desc string
	for _, d := range descs {
		if !strings.HasSuffix(d, "-flat.vmdk") {
			desc = d
		}
	}
	text, err := os.ReadFile(desc)
	if err != nil {
		t.Fatal(err)
	}
	var kept []string
	for _, l := range strings.Split(string(text), "\n") {
		if !strings.HasPrefix(l, "encryptionKeys") {
			kept = append(kept, l)
		}
	}
	os.WriteFile(desc, []byte(strings.Join(kept, "\n")), 0o600)
	r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "check", vm)
	if r.code != exitProblems || !strings.Contains(r.out, "key lines") {
		t.Fatalf("check: %d %q %q", r.code, r.out, r.err)
	}
	r = vmcryptd(t, nil, nil, "--socket", sock, "vm", "check", "--repair", vm, "--json")
	var rep api.CheckReply
	if err := json.Unmarshal([]byte(r.out), &rep); err != nil || r.code != 0 || len(rep.Reports) != 1 || len(rep.Reports[0].Findings) != 0 {
		t.Fatalf("check --repair: %d %q %q %v", r.code, r.out, r.err, err)
	}
	if got, _ := os.ReadFile(desc); !bytes.Contains(got, []byte("encryptionKeys")) {
		t.Fatal("key lines not restored")
	}
	mustRun(t, "--socket", sock, "vm", "decrypt", vm)
}

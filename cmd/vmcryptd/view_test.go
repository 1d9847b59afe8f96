package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// needView requires what a view test uses: the qemu tools and FUSE.
func needView(t *testing.T) {
	t.Helper()
	needBin(t, "qemu-img")
	needBin(t, "qemu-io")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("/dev/fuse missing")
		}
		t.Skip("/dev/fuse missing")
	}
}

// TestViewThroughDaemon mounts the decrypted view of a lab datastore and
// uses it with the real qemu tools.
func TestViewThroughDaemon(t *testing.T) {
	needView(t)
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "viewvm")
	orig := t.TempDir()
	os.MkdirAll(vm, 0o755)
	for _, sf := range []string{"monolithicFlat", "monolithicSparse"} {
		name := "d-" + sf + ".vmdk"
		runCmd(t, vm, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sf, name, "16M")
		runCmd(t, vm, "qemu-io", "-f", "vmdk", "-c", "write -P 0x3c 0 2M", "-c", "write -P 0x7e 9M 512k", name)
	}
	os.WriteFile(filepath.Join(vm, "viewvm.vmx"), []byte("displayName = \"viewvm\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"d-monolithicFlat.vmdk\"\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"d-monolithicSparse.vmdk\"\n"), 0o644)
	runCmd(t, vm, "cp", "-a", ".", orig)
	mustRun(t, "--socket", sock, "vm", "encrypt", vm)

	mp := filepath.Join(dir, "view")
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	t.Cleanup(func() { vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp) })
	view := filepath.Join(mp, "viewvm")
	for _, sf := range []string{"monolithicFlat", "monolithicSparse"} {
		name := "d-" + sf + ".vmdk"
		runCmd(t, orig, "qemu-img", "compare", "-q", filepath.Join(orig, name), filepath.Join(view, name))
	}
	runCmd(t, view, "qemu-img", "check", "-q", "d-monolithicSparse.vmdk")
	// A write through the view lands encrypted at rest.
	runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "write -P 0xcd 4M 1M", "d-monolithicFlat.vmdk")
	runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "read -P 0xcd 4M 1M", "d-monolithicFlat.vmdk")
	// The reads and writes just made show in the status's latency summary.
	seen := map[string]uint64{}
	for _, l := range labStatus(t, dir).ViewLatency {
		seen[l.Kind+" "+l.Op] = l.Count
		if l.Count == 0 || l.MeanMicros <= 0 || (l.P99Micros >= 0 && l.P99Micros < l.P50Micros) {
			t.Errorf("view latency %+v", l)
		}
	}
	for _, k := range []string{"io read", "io write", "op read", "op write", "op lookup"} {
		if seen[k] == 0 {
			t.Errorf("status view latency lacks %q: %v", k, seen)
		}
	}
	if out := mustRun(t, "--socket", sock, "status"); !strings.Contains(out, "VIEW LATENCY") || !strings.Contains(out, "encrypted read") {
		t.Errorf("status text lacks the latency summary:\n%s", out)
	}
	raw, _ := os.ReadFile(filepath.Join(vm, "d-monolithicFlat-flat.vmdk"))
	if bytes.Contains(raw, bytes.Repeat([]byte{0xcd}, 64)) || bytes.Contains(raw, bytes.Repeat([]byte{0x3c}, 64)) {
		t.Fatal("plaintext pattern found at rest")
	}
	// In use: a file open through the view blocks decrypt and unmount.
	f, err := os.Open(filepath.Join(view, "d-monolithicFlat-flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "decrypt", vm)
	if r.code == 0 || !strings.Contains(r.err, "in use") {
		t.Fatalf("decrypt with an open file: %d %s", r.code, r.err)
	}
	r = vmcryptd(t, nil, nil, "--socket", sock, "unmount", mp)
	if r.code == 0 || !strings.Contains(r.err, "d-monolithicFlat-flat.vmdk") {
		t.Fatalf("unmount with an open file: %d %s", r.code, r.err)
	}
	f.Close()
	mustRun(t, "--socket", sock, "unmount", mp)
	// After decrypt the files equal the originals except for the bytes
	// qemu-io wrote through the view.
	mustRun(t, "--socket", sock, "vm", "decrypt", vm)
	runCmd(t, vm, "qemu-io", "-f", "vmdk", "-c", "read -P 0xcd 4M 1M", "-c", "read -P 0x3c 0 2M", "d-monolithicFlat.vmdk")
	got, _ := os.ReadFile(filepath.Join(vm, "d-monolithicSparse.vmdk"))
	want, _ := os.ReadFile(filepath.Join(orig, "d-monolithicSparse.vmdk"))
	if !bytes.Equal(got, want) {
		t.Fatal("sparse disk differs after encrypt, view, decrypt")
	}
}

// TestViewNewDisks makes disks with qemu-img inside an encrypted VM
// through the view, in every subformat: each lands encrypted at rest,
// descriptors become plain text naming their key, and the disks stay
// usable through the view, after a remount, and after a decrypt.
func TestViewNewDisks(t *testing.T) {
	needView(t)
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "newdisks")
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "newdisks", "--encrypt")
	mp := filepath.Join(dir, "view")
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	t.Cleanup(func() { vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp) })
	view := filepath.Join(mp, "newdisks")

	type newDisk struct {
		sf      string
		extents []string // files at rest that must be containers
		text    bool     // the .vmdk is a plain text descriptor at rest
	}
	disks := []newDisk{
		{"monolithicSparse", []string{"n-monolithicSparse.vmdk"}, false},
		{"monolithicFlat", []string{"n-monolithicFlat-flat.vmdk"}, true},
		{"twoGbMaxExtentSparse", []string{"n-twoGbMaxExtentSparse-s001.vmdk"}, true},
		{"twoGbMaxExtentFlat", []string{"n-twoGbMaxExtentFlat-f001.vmdk"}, true},
		{"streamOptimized", []string{"n-streamOptimized.vmdk"}, false},
	}
	for _, d := range disks {
		name := "n-" + d.sf + ".vmdk"
		if d.sf == "streamOptimized" {
			// streamOptimized is written once, by convert.
			src := filepath.Join(t.TempDir(), "src.vmdk")
			runCmd(t, view, "qemu-img", "create", "-q", "-f", "vmdk", src, "16M")
			runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 1M 1M", src)
			runCmd(t, view, "qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, name)
		} else {
			runCmd(t, view, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+d.sf, name, "16M")
			runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 1M 1M", name)
		}
		// Right after the tool's close, the view serves the final file.
		out := runCmd(t, view, "qemu-img", "info", name)
		if !strings.Contains(out, "virtual size: 16 MiB") {
			t.Fatalf("%s: qemu-img info through the view:\n%s", name, out)
		}
		runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0 0 1M", name)
		if d.sf != "streamOptimized" && !strings.HasSuffix(d.sf, "Flat") {
			runCmd(t, view, "qemu-img", "check", "-q", name)
		}
		// At rest.
		raw, err := os.ReadFile(filepath.Join(vm, name))
		if err != nil {
			t.Fatal(err)
		}
		if d.text {
			if !bytes.HasPrefix(raw, []byte("# Disk DescriptorFile")) || !bytes.Contains(raw, []byte(`encryptionKeys="vmware:key/list/`)) || !bytes.Contains(raw, []byte("ddb.vmcryptd.diskId")) {
				t.Fatalf("%s at rest is not a descriptor with its key lines:\n%.600s", name, raw)
			}
		}
		for _, e := range d.extents {
			raw, err := os.ReadFile(filepath.Join(vm, e))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(raw[:1024], []byte("VMCRYPTD")) {
				t.Fatalf("%s at rest is not a container", e)
			}
			if bytes.Contains(raw, bytes.Repeat([]byte{0x5a}, 64)) || bytes.Contains(raw, []byte("KDMV")) || bytes.Contains(raw, []byte("createType")) {
				t.Fatalf("%s at rest holds plaintext", e)
			}
		}
	}
	// Outside the VM directory a new disk stays plain.
	runCmd(t, mp, "qemu-img", "create", "-q", "-f", "vmdk", "plain.vmdk", "1M")
	if raw, _ := os.ReadFile(filepath.Join(dir, "datastore", "plain.vmdk")); !bytes.HasPrefix(raw, []byte("KDMV")) {
		t.Fatal("a disk created outside any VM was not left plain")
	}

	// A remount (same daemon) still knows the disks it made: unattached
	// sparse disks open with their own key copy.
	mustRun(t, "--socket", sock, "unmount", mp)
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	for _, n := range []string{"n-monolithicSparse.vmdk", "n-streamOptimized.vmdk"} {
		if out := runCmd(t, view, "qemu-img", "info", n); !strings.Contains(out, "virtual size: 16 MiB") {
			t.Fatalf("%s after a remount:\n%s", n, out)
		}
	}

	// Attach them all (the vmx is plain text), remount, and read again.
	vmxPath := filepath.Join(view, "newdisks.vmx")
	vmxText, err := os.ReadFile(vmxPath)
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range disks {
		vmxText = fmt.Appendf(vmxText, "scsi1:%d.present = \"TRUE\"\nscsi1:%d.fileName = \"n-%s.vmdk\"\n", i, i, d.sf)
	}
	if err := os.WriteFile(vmxPath, vmxText, 0o644); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "--socket", sock, "unmount", mp)
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	for _, d := range disks {
		runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "read -P 0x5a 1M 1M", "n-"+d.sf+".vmdk")
	}
	// qemu-img create over an existing encrypted disk is refused before
	// it changes anything: its descriptor holds the key lines and is never
	// truncated in place.
	over := "n-monolithicFlat.vmdk"
	before, _ := os.ReadFile(filepath.Join(vm, over))
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", filepath.Join(view, over), "16M").CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "not permitted") {
		log, _ := os.ReadFile(filepath.Join(dir, "daemon.log"))
		now, _ := os.ReadFile(filepath.Join(vm, over))
		t.Fatalf("qemu-img create over an encrypted disk: %v\n%s\n%q\n%s", err, out, now, log)
	}
	if after, _ := os.ReadFile(filepath.Join(vm, over)); !bytes.Equal(after, before) {
		t.Fatalf("refused create changed the descriptor:\n%s", after)
	}
	runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "read -P 0x5a 1M 1M", over)
	// Lines lost outside the view (an editor on the host): the extent
	// keeps its header copy, so nothing is lost, but nothing trusts that
	// copy on its own (a guest could have written it): the view refuses
	// the extent, vm status names the problem, and restore-keys writes the
	// lines back.
	mustRun(t, "--socket", sock, "unmount", mp)
	var kept []string
	for _, line := range strings.SplitAfter(string(before), "\n") {
		if !strings.HasPrefix(line, "encryptionKeys") && !strings.HasPrefix(line, "ddb.vmcryptd.diskId") {
			kept = append(kept, line)
		}
	}
	if err := os.WriteFile(filepath.Join(vm, over), []byte(strings.Join(kept, "")), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := mustRun(t, "--socket", sock, "vm", "status", vm); !strings.Contains(out, "problem: disk "+over+": its descriptor has no encryptionKeys") {
		t.Fatalf("vm status does not report the lost key lines:\n%s", out)
	}
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	if _, err := os.ReadFile(filepath.Join(view, "n-monolithicFlat-flat.vmdk")); !errors.Is(err, syscall.EACCES) {
		t.Fatalf("extent of a disk that lost its key lines: %v, want EACCES", err)
	}
	mustRun(t, "--socket", sock, "unmount", mp)
	if out := mustRun(t, "--socket", sock, "disk", "restore-keys", vm, over); !strings.Contains(out, "key lines restored") {
		t.Fatalf("restore-keys: %s", out)
	}
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	runCmd(t, view, "qemu-io", "-f", "vmdk", "-c", "read -P 0x5a 1M 1M", over)
	mustRun(t, "--socket", sock, "unmount", mp)
	// A shallow rekey, then decrypt: every disk comes back plain and whole.
	mustRun(t, "--socket", sock, "vm", "rekey", vm)
	if raw, _ := os.ReadFile(filepath.Join(vm, over)); !bytes.Contains(raw, []byte(`encryptionKeys="vmware:key/list/`)) || !bytes.Contains(raw, []byte("ddb.vmcryptd.diskId")) {
		t.Fatalf("key lines missing after restore and rekey:\n%s", raw)
	}
	mustRun(t, "--socket", sock, "vm", "decrypt", vm)
	for _, d := range disks {
		runCmd(t, vm, "qemu-io", "-f", "vmdk", "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0 2M 1M", "n-"+d.sf+".vmdk")
		if raw, _ := os.ReadFile(filepath.Join(vm, "n-"+d.sf+".vmdk")); bytes.Contains(raw, []byte("encryptionKeys")) {
			t.Fatalf("n-%s.vmdk still names a key after decrypt", d.sf)
		}
	}
}

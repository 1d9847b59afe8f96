package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

// TestExportThroughDaemon exports the disks of an encrypted lab VM over
// NBD and uses them with real clients: qemu-img compare against the
// plain originals, nbdinfo --map holes, fio's nbd engine with verify;
// conversions are refused while exported, exports survive a daemon
// restart and a kill -9 of the daemon (serving the same bytes, with
// the flushed writes), and a decrypt afterwards holds exactly what was
// written.
func TestExportThroughDaemon(t *testing.T) {
	for _, b := range []string{"qemu-img", "qemu-io", "nbdinfo", "fio"} {
		needBin(t, b)
	}
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "nbdvm")
	orig := t.TempDir()
	os.MkdirAll(vm, 0o755)
	for _, sf := range []string{"monolithicFlat", "monolithicSparse"} {
		name := "d-" + sf + ".vmdk"
		runCmd(t, vm, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sf, name, "32M")
		runCmd(t, vm, "qemu-io", "-f", "vmdk", "-c", "write -P 0x3c 0 2M", "-c", "write -P 0x7e 9M 512k", name)
	}
	os.WriteFile(filepath.Join(vm, "nbdvm.vmx"), []byte("displayName = \"nbdvm\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"d-monolithicFlat.vmdk\"\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"d-monolithicSparse.vmdk\"\n"), 0o644)
	runCmd(t, vm, "cp", "-a", ".", orig)
	mustRun(t, "--socket", sock, "vm", "encrypt", vm)

	flat, sparse := filepath.Join(vm, "d-monolithicFlat.vmdk"), filepath.Join(vm, "d-monolithicSparse.vmdk")
	s1, s2 := filepath.Join(dir, "flat.sock"), filepath.Join(dir, "sparse.sock")
	stopAll := func() {
		vmcryptd(t, nil, nil, "--socket", sock, "export", "stop", s1)
		vmcryptd(t, nil, nil, "--socket", sock, "export", "stop", s2)
	}
	t.Cleanup(stopAll)
	mustRun(t, "--socket", sock, "export", "start", flat, "--unix", s1)
	if r := vmcryptd(t, nil, nil, "--socket", sock, "export", "start", sparse, "--unix", s2); r.code == 0 || !strings.Contains(r.err, "read-only") {
		t.Fatalf("read-write export of a sparse disk: %d %s", r.code, r.err)
	}
	mustRun(t, "--socket", sock, "export", "start", sparse, "--unix", s2, "--read-only", "--name", "sparse")
	if st, err := os.Stat(s1); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("export socket: %v %v", st, err)
	}
	u1, u2 := "nbd+unix:///?socket="+s1, "nbd+unix:///sparse?socket="+s2
	runCmd(t, orig, "qemu-img", "compare", "-q", "-f", "vmdk", "-F", "raw", "d-monolithicFlat.vmdk", u1)
	runCmd(t, orig, "qemu-img", "compare", "-q", "-f", "vmdk", "-F", "raw", "d-monolithicSparse.vmdk", u2)
	// Holes of the sparse disk and of the flat container reach the client.
	for _, u := range []string{u1, u2} {
		var m []struct {
			Offset, Length int64
			Type           uint32
		}
		if err := json.Unmarshal([]byte(runCmd(t, dir, "nbdinfo", "--map", "--json", u)), &m); err != nil {
			t.Fatal(err)
		}
		var data int64
		for _, e := range m {
			if e.Type&1 == 0 {
				data += e.Length
			}
		}
		if data < 2560<<10 || data > 4<<20 {
			t.Fatalf("%s: %d bytes of data mapped, want about 2.5 MiB: %+v", u, data, m)
		}
	}
	// Reads and writes under concurrency, verified.
	runCmd(t, dir, "fio", "--name=verify", "--ioengine=nbd", "--uri="+u1, "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--size=16M", "--offset=8M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=terse")
	if r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "decrypt", vm); r.code == 0 || !strings.Contains(r.err, "NBD export") {
		t.Fatalf("decrypt while exported: %d %s", r.code, r.err)
	}
	var list []api.ExportInfo
	if err := json.Unmarshal([]byte(mustRun(t, "--socket", sock, "export", "list", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Error != "" || list[1].Error != "" {
		t.Fatalf("export list: %+v", list)
	}
	if st := labStatus(t, dir); len(st.Exports) != 2 {
		t.Fatalf("status exports: %+v", st.Exports)
	}
	before := filepath.Join(t.TempDir(), "before.raw")
	runCmd(t, dir, "qemu-img", "convert", "-O", "raw", u1, before)

	// Restart: the exports come back.
	mustRun(t, "lab", "down", "--dir", dir)
	mustRun(t, "lab", "up", "--dir", dir)
	runCmd(t, dir, "qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", before, u1)
	runCmd(t, orig, "qemu-img", "compare", "-q", "-f", "vmdk", "-F", "raw", "d-monolithicSparse.vmdk", u2)

	// kill -9: the restarted daemon serves the same bytes again, with
	// what was written and flushed before the kill.
	runCmd(t, dir, "qemu-io", "-f", "raw", "-c", "write -P 0xa5 20M 1M", "-c", "flush", u1)
	runCmd(t, dir, "qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 1M", "-c", "write -P 0xa5 20M 1M", before)
	pid := readPID(filepath.Join(dir, "daemon.pid"))
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for syscall.Kill(pid, 0) == nil {
		time.Sleep(20 * time.Millisecond)
	}
	if out, err := exec.Command("qemu-img", "info", u1).CombinedOutput(); err == nil {
		t.Fatalf("export served with the daemon killed:\n%s", out)
	}
	restartDaemon(t, dir)
	runCmd(t, orig, "qemu-img", "compare", "-q", "-f", "vmdk", "-F", "raw", "d-monolithicSparse.vmdk", u2)
	runCmd(t, dir, "qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 1M", "-c", "flush", u1)
	runCmd(t, dir, "qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", before, u1)

	mustRun(t, "--socket", sock, "export", "stop", s1)
	mustRun(t, "--socket", sock, "export", "stop", "sparse")
	if _, err := os.Stat(s1); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
	mustRun(t, "--socket", sock, "vm", "decrypt", vm)
	runCmd(t, vm, "qemu-img", "compare", "-q", "-f", "raw", "-F", "vmdk", before, "d-monolithicFlat.vmdk")
	got, _ := os.ReadFile(sparse)
	want, _ := os.ReadFile(filepath.Join(orig, "d-monolithicSparse.vmdk"))
	if !bytes.Equal(got, want) {
		t.Fatal("read-only exported sparse disk changed")
	}
}

// TestExportRefusedWhileConverting: export start is refused (naming the
// conversion) while vm encrypt runs on the disk's VM. The encrypt of a
// 384 MiB flat disk streams its progress; export start is tried once the
// disk's extent is under way (less than a quarter done). A start that is
// accepted fails the test if the encrypt reports 64 MiB or more of
// further progress afterwards (the two overlapped); one that could have
// come after the conversion is inconclusive and the cycle is repeated.
func TestExportRefusedWhileConverting(t *testing.T) {
	needBin(t, "qemu-img")
	needBin(t, "qemu-io")
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "convvm")
	os.MkdirAll(vm, 0o755)
	const size = 384 << 20
	runCmd(t, vm, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "d.vmdk", "384M")
	runCmd(t, vm, "qemu-io", "-f", "vmdk", "-c", "write -P 0x61 0 384M", "d.vmdk")
	os.WriteFile(filepath.Join(vm, "convvm.vmx"), []byte("displayName = \"convvm\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"d.vmdk\"\n"), 0o644)
	disk, es := filepath.Join(vm, "d.vmdk"), filepath.Join(dir, "conv.sock")
	t.Cleanup(func() { vmcryptd(t, nil, nil, "--socket", sock, "export", "stop", es) })
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	refused := false
	for cycle := 0; cycle < 5 && !refused; cycle++ {
		if strings.Contains(mustRun(t, "--socket", sock, "vm", "status", vm), ": encrypted") {
			mustRun(t, "--socket", sock, "vm", "decrypt", vm)
		}
		enc := exec.Command(self, "--socket", sock, "vm", "encrypt", vm)
		enc.Env = append(os.Environ(), asMainEnv+"=1")
		var encErr strings.Builder
		enc.Stderr = &encErr
		out, pw := io.Pipe()
		enc.Stdout = pw
		if err := enc.Start(); err != nil {
			t.Fatal(err)
		}
		var flatDone atomic.Int64
		early := make(chan struct{}) // the extent is under way, mostly left
		go func() {
			sc := bufio.NewScanner(out)
			once := false
			for sc.Scan() {
				var ev struct {
					Progress *struct {
						File        string
						Done, Total int64
					}
				}
				if json.Unmarshal(sc.Bytes(), &ev) != nil || ev.Progress == nil || ev.Progress.File != "d-flat.vmdk" {
					continue
				}
				flatDone.Store(ev.Progress.Done)
				if !once && ev.Progress.Done < size/4 {
					once = true
					close(early)
				}
			}
			io.Copy(io.Discard, out)
		}()
		ended := make(chan error, 1)
		go func() { err := enc.Wait(); pw.Close(); ended <- err }()
		select {
		case <-early:
			r := vmcryptd(t, nil, nil, "--socket", sock, "export", "start", disk, "--unix", es, "--read-only")
			if r.code != 0 {
				if !strings.Contains(r.err, "being converted") {
					t.Fatalf("export start during the encrypt: exit %d: %s", r.code, r.err)
				}
				refused = true
				break
			}
			at := flatDone.Load()
			encRes := <-ended
			if after := flatDone.Load(); after-at >= 64<<20 {
				t.Fatalf("export started at %d bytes of the extent's encryption, which went on to %d (encrypt: %v)", at, after, encRes)
			}
			mustRun(t, "--socket", sock, "export", "stop", es)
			t.Logf("cycle %d: the start was accepted at the conversion's end; again", cycle)
			continue
		case err := <-ended:
			t.Logf("cycle %d: the encrypt ended (%v) before its extent was seen under way; again", cycle, err)
			continue
		}
		if err := <-ended; err != nil {
			t.Fatalf("vm encrypt: %v: %s", err, encErr.String())
		}
	}
	if !refused {
		t.Fatal("no export start was refused during an encrypt in 5 tries")
	}
	// After the conversion the export serves the encrypted disk.
	mustRun(t, "--socket", sock, "export", "start", disk, "--unix", es, "--read-only")
	runCmd(t, dir, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x61 0 1M", "-c", "read -P 0x61 383M 1M", "nbd+unix:///?socket="+es)
	mustRun(t, "--socket", sock, "export", "stop", es)
}

package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/manager"
)

func hostSock(dir string, k int) string {
	return filepath.Join(dir, "host"+itoa(k), "vmcryptd.sock")
}

func hostStatus(t *testing.T, sock string) api.Status {
	t.Helper()
	var st api.Status
	out := mustRun(t, "--socket", sock, "status", "--json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st
}

// waitVM waits until the host reports dir unlocked (or locked with a
// reason containing want when want is not empty).
func waitVM(t *testing.T, sock, dir, want string) api.VMLockState {
	t.Helper()
	var last api.VMLockState
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		for _, vm := range hostStatus(t, sock).VMs {
			if vm.Dir != dir {
				continue
			}
			last = vm
			if (want == "" && !vm.Locked) || (want != "" && vm.Locked && strings.Contains(vm.Reason, want)) {
				return vm
			}
		}
	}
	t.Fatalf("VM %s on %s: last state %+v, want locked=%v %q", dir, sock, last, want != "", want)
	return last
}

// viewReadWrite mounts the shared datastore on a host, optionally writes
// data at offset 64 KiB of the VM's flat disk through the view, reads
// the same range back and unmounts.
func viewReadWrite(t *testing.T, sock, mp, vm string, write []byte, n int) ([]byte, error) {
	t.Helper()
	mustRun(t, "--socket", sock, "mount", "shared", mp)
	defer mustRun(t, "--socket", sock, "unmount", "--force", mp)
	p := filepath.Join(mp, vm, vm+"-flat.vmdk")
	if write != nil {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			return nil, err
		}
		if _, err := f.WriteAt(write, 64<<10); err != nil {
			f.Close()
			return nil, err
		}
		if err := f.Close(); err != nil {
			return nil, err
		}
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, 64<<10); err != nil {
		return nil, err
	}
	return buf, nil
}

// TestManagerLab is the multi-host lab end to end: hosts without KMS
// credentials, a key re-fetched through the manager after kill -9 of a
// host, need-to-know refusals audited, host removal and takeover.
func TestManagerLab(t *testing.T) {
	dir := startLab(t, "--hosts", "2", "--key-retry", "1s")
	env, err := os.ReadFile(filepath.Join(dir, "lab.env"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(env), "export VMCRYPTD_MANAGER_SOCKET=") || !strings.Contains(string(env), `VMCRYPTD_SOCKET="`+hostSock(dir, 1)+`"`) {
		t.Fatalf("lab.env:\n%s", env)
	}
	kmsAddr, _ := os.ReadFile(filepath.Join(dir, "kms.addr"))
	kmsKey, _ := os.ReadFile(filepath.Join(dir, "kms", "client-key.pem"))
	for k := 1; k <= 2; k++ {
		cfg, err := os.ReadFile(filepath.Join(dir, "host"+itoa(k), "vmcryptd.toml"))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(cfg, []byte("[[kms]]")) || bytes.Contains(cfg, bytes.TrimSpace(kmsAddr)) || bytes.Contains(cfg, []byte(filepath.Join(dir, "kms"))) {
			t.Fatalf("host%d's config names the KMS:\n%s", k, cfg)
		}
		filepath.Walk(filepath.Join(dir, "host"+itoa(k)), func(p string, info os.FileInfo, err error) error {
			if err == nil && info.Mode().IsRegular() {
				if b, _ := os.ReadFile(p); len(kmsKey) > 0 && bytes.Contains(b, bytes.TrimSpace(kmsKey)) {
					t.Errorf("%s holds the KMS client key", p)
				}
			}
			return nil
		})
		if ks := hostStatus(t, hostSock(dir, k)).KeySource; ks.Mode != "manager" || !ks.Reachable || ks.Host != "host"+itoa(k) {
			t.Fatalf("host%d key source: %+v", k, ks)
		}
	}

	// host1 creates an encrypted VM on the shared datastore and writes
	// through its view.
	h1, h2 := hostSock(dir, 1), hostSock(dir, 2)
	vm1 := filepath.Join(dir, "shared", "vm1")
	mustRun(t, "--socket", h1, "vm", "create", "--name", "vm1", "--disk", "4M", "--encrypt", vm1)
	data := make([]byte, 256<<10)
	rand.Read(data)
	mp1 := filepath.Join(t.TempDir(), "view")
	got, err := viewReadWrite(t, h1, mp1, "vm1", data, len(data))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("host1 view: %v", err)
	}

	// kill -9 host1 and restart it: the KEK comes again through the manager.
	pid := readPID(filepath.Join(dir, "host1", "daemon.pid"))
	before := hostStatus(t, h1).PID
	syscall.Kill(pid, syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); alive(filepath.Join(dir, "host1", "daemon.pid")) && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	mustRun(t, "lab", "up", "--dir", dir, "--hosts", "2", "--key-retry", "1s")
	if hostStatus(t, h1).PID == before {
		t.Fatal("host1 was not restarted")
	}
	waitVM(t, h1, vm1, "")
	got, err = viewReadWrite(t, h1, mp1, "vm1", nil, len(data))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after kill -9 and restart, host1 reads back other bytes (err %v)", err)
	}

	// host2 sees the VM on the shared datastore but is refused its key.
	r := vmcryptd(t, nil, nil, "--socket", h2, "vm", "register", vm1)
	if r.code == 0 || !strings.Contains(r.err, `registered to host "host1"`) || strings.Count(strings.TrimSpace(r.err), "\n") > 0 {
		t.Fatalf("host2 vm register of host1's VM: exit %d, %s", r.code, r.err)
	}
	mp2 := filepath.Join(t.TempDir(), "view2")
	if _, err := viewReadWrite(t, h2, mp2, "vm1", nil, 4096); err == nil {
		t.Fatal("host2 read host1's VM through its view")
	}
	waitVM(t, h2, vm1, `belongs to host "host1"`)
	// The key loop (every second here) does not ask again for a key the
	// manager refused: one audited denial, not one per retry.
	denials := func() int {
		b, _ := os.ReadFile(filepath.Join(dir, "manager", "audit.log"))
		n := 0
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, `"host":"host2","op":"host.get_key"`) && strings.Contains(line, `"result":"denied"`) {
				n++
			}
		}
		return n
	}
	n0 := denials()
	time.Sleep(3 * time.Second)
	if n := denials(); n != n0 {
		t.Errorf("host2 asked again for a refused key: %d denials, then %d 3 s later", n0, n)
	}
	audit, err := os.ReadFile(filepath.Join(dir, "manager", "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"host":"host2","op":"host.register_vm"`, `"host":"host2","op":"host.get_key"`} {
		found := false
		for _, line := range strings.Split(string(audit), "\n") {
			if strings.Contains(line, want) && strings.Contains(line, `"result":"denied"`) {
				found = true
			}
		}
		if !found {
			t.Errorf("manager audit log has no denial %s", want)
		}
	}
	if bytes.Contains(audit, data[:32]) {
		t.Error("audit log holds VM data")
	}

	// host2 has a VM of its own, which keeps working.
	vm2 := filepath.Join(dir, "host2", "datastore", "vm2")
	mustRun(t, "--socket", h2, "vm", "create", "--name", "vm2", "--disk", "1M", "--encrypt", vm2)
	waitVM(t, h2, vm2, "")

	// Removing host1 cuts it off at once; its VM is released and host2
	// takes it over, reading the same bytes.
	out := mustRun(t, "manager", "host", "remove", "host1", "--manager-socket", filepath.Join(dir, "manager", "manager.sock"))
	if !strings.Contains(out, "1 VM(s) released") {
		t.Fatalf("host remove: %s", out)
	}
	r = vmcryptd(t, nil, nil, "--socket", h1, "vm", "create", "--name", "vm3", "--disk", "1M", "--encrypt", filepath.Join(dir, "host1", "datastore", "vm3"))
	if r.code == 0 || !strings.Contains(r.err, "revoked") {
		t.Fatalf("removed host1 still makes keys: exit %d, %s", r.code, r.err)
	}
	mustRun(t, "--socket", h2, "vm", "register", vm1)
	waitVM(t, h2, vm1, "")
	got, err = viewReadWrite(t, h2, mp2, "vm1", nil, len(data))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("host2 after takeover reads other bytes (err %v)", err)
	}
	waitVM(t, h2, vm2, "")

	var ms manager.Status
	if err := json.Unmarshal([]byte(mustRun(t, "--socket", filepath.Join(dir, "manager", "manager.sock"), "status", "--json")), &ms); err != nil {
		t.Fatal(err)
	}
	if len(ms.Hosts) != 1 || ms.Hosts[0].Name != "host2" || len(ms.VMs) != 2 {
		t.Fatalf("manager status after removal: hosts %+v vms %+v", ms.Hosts, ms.VMs)
	}
}

// TestManagerOutage: with the manager down a host keeps serving the keys
// it holds, new unlocks fail with "manager unreachable", and the host
// recovers by itself once the manager is back.
func TestManagerOutage(t *testing.T) {
	dir := startLab(t, "--hosts", "1", "--key-retry", "1s")
	h1 := hostSock(dir, 1)
	vm1 := filepath.Join(dir, "host1", "datastore", "vm1")
	mustRun(t, "--socket", h1, "vm", "create", "--name", "vm1", "--disk", "1M", "--encrypt", vm1)
	waitVM(t, h1, vm1, "")
	if err := stopPID(filepath.Join(dir, "manager", "manager.pid")); err != nil {
		t.Fatal(err)
	}
	// Cached keys keep serving.
	if st := hostStatus(t, h1); st.VMs[0].Locked {
		t.Fatalf("VM locked while its key is cached: %+v", st.VMs[0])
	}
	r := vmcryptd(t, nil, nil, "--socket", h1, "vm", "create", "--name", "vm2", "--disk", "1M", "--encrypt", filepath.Join(dir, "host1", "datastore", "vm2"))
	if r.code == 0 || !strings.Contains(r.err, "manager unreachable") || strings.Count(strings.TrimSpace(r.err), "\n") > 0 {
		t.Fatalf("new key with the manager down: exit %d, %s", r.code, r.err)
	}
	// A restarted host cannot unlock, and says why.
	syscall.Kill(readPID(filepath.Join(dir, "host1", "daemon.pid")), syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); alive(filepath.Join(dir, "host1", "daemon.pid")) && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	os.Setenv(asMainEnv, "1")
	err := spawn(mustExe(t), filepath.Join(dir, "host1", "daemon.log"), filepath.Join(dir, "host1", "daemon.pid"), "--socket", h1, "serve", "--config", filepath.Join(dir, "host1", "vmcryptd.toml"))
	os.Unsetenv(asMainEnv)
	if err != nil {
		t.Fatal(err)
	}
	if err := waitDaemon(&globals{socket: h1}, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	waitVM(t, h1, vm1, "manager unreachable")
	if ks := hostStatus(t, h1).KeySource; ks.Reachable || !strings.Contains(ks.Error, "manager unreachable") {
		t.Fatalf("key source with the manager down: %+v", ks)
	}
	// The manager comes back (same port): the host unlocks by itself.
	mustRun(t, "lab", "up", "--dir", dir, "--hosts", "1", "--key-retry", "1s")
	waitVM(t, h1, vm1, "")
	if ks := hostStatus(t, h1).KeySource; !ks.Reachable {
		t.Fatalf("key source after recovery: %+v", ks)
	}
}

func mustExe(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return self
}

func managerVMs(t *testing.T, dir string) map[string]manager.VMInfo {
	t.Helper()
	var ms manager.Status
	if err := json.Unmarshal([]byte(mustRun(t, "--socket", filepath.Join(dir, "manager", "manager.sock"), "status", "--json")), &ms); err != nil {
		t.Fatal(err)
	}
	out := map[string]manager.VMInfo{}
	for _, vm := range ms.VMs {
		out[vm.Dir] = vm
	}
	return out
}

// TestManagerRegistrationFollowsConversions: encrypting a VM registers
// it with the manager under its new key, a shallow rekey re-registers it
// under the new key, decrypting unregisters it, and vm unregister /
// register move it out of and back into the inventory.
func TestManagerRegistrationFollowsConversions(t *testing.T) {
	dir := startLab(t, "--hosts", "1", "--key-retry", "1s")
	h1 := hostSock(dir, 1)
	vm := filepath.Join(dir, "host1", "datastore", "vm1")
	mustRun(t, "--socket", h1, "vm", "create", "--name", "vm1", "--disk", "1M", vm)
	if _, ok := managerVMs(t, dir)[vm]; ok {
		t.Fatal("a plain VM is in the manager's inventory")
	}
	mustRun(t, "--socket", h1, "vm", "encrypt", vm)
	rec, ok := managerVMs(t, dir)[vm]
	if !ok || rec.Host != "host1" || len(rec.Keys) != 1 {
		t.Fatalf("after encrypt: %+v", rec)
	}
	mustRun(t, "--socket", h1, "vm", "rekey", vm)
	if rec2 := managerVMs(t, dir)[vm]; len(rec2.Keys) != 1 || rec2.Keys[0] == rec.Keys[0] || rec2.ID != rec.ID {
		t.Fatalf("after shallow rekey: %+v (before %+v)", rec2, rec)
	}
	mustRun(t, "--socket", h1, "vm", "unregister", vm)
	if _, ok := managerVMs(t, dir)[vm]; ok {
		t.Fatal("still in the inventory after vm unregister")
	}
	mustRun(t, "--socket", h1, "vm", "register", vm)
	waitVM(t, h1, vm, "")
	mustRun(t, "--socket", h1, "vm", "decrypt", vm)
	if _, ok := managerVMs(t, dir)[vm]; ok {
		t.Fatal("a decrypted VM is still in the manager's inventory")
	}
}

package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/manager"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

// dirFiles reads every regular file under dir, by relative path.
func dirFiles(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil || !info.Mode().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(dir, p)
		out[rel] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameFiles(t *testing.T, what string, got, want map[string][]byte) {
	t.Helper()
	for name, b := range want {
		if g, ok := got[name]; !ok || !bytes.Equal(g, b) {
			t.Errorf("%s: %s differs (present %v, %d bytes, want %d)", what, name, ok, len(g), len(b))
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("%s: unexpected file %s", what, name)
		}
	}
}

func managerPolicies(t *testing.T, msock string) map[string]manager.PolicyInfo {
	t.Helper()
	var ps []manager.PolicyInfo
	if err := json.Unmarshal([]byte(mustRun(t, "manager", "policy", "list", "--json", "--manager-socket", msock)), &ps); err != nil {
		t.Fatal(err)
	}
	out := map[string]manager.PolicyInfo{}
	for _, p := range ps {
		out[p.Name] = p
	}
	return out
}

func vmStatusJSON(t *testing.T, sock, dir string) api.VMStatusReply {
	t.Helper()
	var st api.VMStatusReply
	if err := json.Unmarshal([]byte(mustRun(t, "--socket", sock, "vm", "status", "--json", dir)), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func oneLineErr(t *testing.T, what string, r runResult, want string) {
	t.Helper()
	if r.code == 0 || !strings.Contains(r.err, want) || strings.Count(strings.TrimSpace(r.err), "\n") > 0 {
		t.Fatalf("%s: exit %d, stderr %q, want a one-line error containing %q", what, r.code, r.err, want)
	}
}

// TestManagerStoragePolicy: a storage policy made on the manager is what
// `policy list` shows on the hosts and what `policy set` on host1
// resolves: the VM is encrypted under the policy's provider (same bytes
// through the view), the manager records the VM's policy and keeps both
// across a restart, refuses to remove a policy in use, and a manager
// outage makes policy set fail with nothing changed; setting Datastore
// Default decrypts back to the original bytes.
func TestManagerStoragePolicy(t *testing.T) {
	needView(t)
	labArgs := []string{"--hosts", "2", "--key-retry", "1s"}
	dir := startLab(t, labArgs...)
	h1, h2 := hostSock(dir, 1), hostSock(dir, 2)
	msock := filepath.Join(dir, "manager", "manager.sock")
	mpid := filepath.Join(dir, "manager", "manager.pid")

	out := mustRun(t, "manager", "policy", "create", "Gold", "--encrypt", "--provider", labProvider, "--description", "PCI VMs", "--manager-socket", msock)
	if !strings.Contains(out, `policy "Gold" created: encrypts under provider `+labProvider) {
		t.Fatalf("policy create: %s", out)
	}
	mustRun(t, "manager", "policy", "create", "Plain tier", "--manager-socket", msock)
	oneLineErr(t, "create a duplicate", vmcryptd(t, nil, nil, "manager", "policy", "create", "gold", "--manager-socket", msock), `"Gold" already exists`)
	oneLineErr(t, "create with an unknown provider", vmcryptd(t, nil, nil, "manager", "policy", "create", "X", "--encrypt", "--provider", "nope", "--manager-socket", msock), `"nope" is not configured`)
	oneLineErr(t, "remove a built-in", vmcryptd(t, nil, nil, "manager", "policy", "remove", mgrproto.PolicyEncrypt, "--manager-socket", msock), "built in")

	// Both hosts list the manager's policies.
	for _, h := range []string{h1, h2} {
		var ps []api.Policy
		if err := json.Unmarshal([]byte(mustRun(t, "--socket", h, "policy", "list", "--json")), &ps); err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, p := range ps {
			names = append(names, p.Name)
			if p.Source != "manager" || (p.Name == "Gold" && (!p.Encrypts || p.Provider != labProvider)) {
				t.Errorf("%s policy list: %+v", h, p)
			}
		}
		if strings.Join(names, "|") != mgrproto.PolicyEncrypt+"|"+mgrproto.PolicyDefault+"|Gold|Plain tier" {
			t.Fatalf("%s policy list: %v", h, names)
		}
	}

	// A plain VM on the shared datastore, with data in its disk.
	vm := filepath.Join(dir, "shared", "pvm")
	mustRun(t, "--socket", h1, "vm", "create", "--name", "pvm", "--disk", "4M", vm)
	data := make([]byte, 128<<10)
	rand.Read(data)
	f, err := os.OpenFile(filepath.Join(vm, "pvm-flat.vmdk"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 64<<10); err != nil {
		t.Fatal(err)
	}
	f.Close()
	orig := dirFiles(t, vm)

	oneLineErr(t, "policy set to an unknown policy", vmcryptd(t, nil, nil, "--socket", h1, "policy", "set", vm, "Nope"), `no storage policy "Nope"`)
	sameFiles(t, "after an unknown policy", dirFiles(t, vm), orig)

	mustRun(t, "--socket", h1, "policy", "set", vm, "Gold")
	st := vmStatusJSON(t, h1, vm)
	if !st.Encrypted || st.Policy != "Gold" || len(st.KEKs) == 0 || !strings.HasPrefix(st.KEKs[0], labProvider+"/") {
		t.Fatalf("after policy set Gold: encrypted %v, policy %q, keys %v", st.Encrypted, st.Policy, st.KEKs)
	}
	if b, _ := os.ReadFile(filepath.Join(vm, "pvm-flat.vmdk")); bytes.Contains(b, data[:4096]) {
		t.Fatal("the encrypted disk holds the plain data")
	}
	mp := filepath.Join(t.TempDir(), "view")
	if got, err := viewReadWrite(t, h1, mp, "pvm", nil, len(data)); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("view of the VM under Gold reads other bytes (err %v)", err)
	}
	rec, ok := managerVMs(t, dir)[vm]
	if !ok || rec.Host != "host1" || rec.Policy != "Gold" {
		t.Fatalf("manager inventory after policy set: %+v (present %v)", rec, ok)
	}
	if out := mustRun(t, "--socket", msock, "status"); !strings.Contains(out, "Gold") {
		t.Errorf("manager status does not show the VM's policy:\n%s", out)
	}
	oneLineErr(t, "remove a policy in use", vmcryptd(t, nil, nil, "manager", "policy", "remove", "Gold", "--manager-socket", msock), `in use by VM pvm (`+rec.ID+`) on host "host1"`)
	// Setting the policy it already has converts nothing.
	enc := dirFiles(t, vm)
	mustRun(t, "--socket", h1, "policy", "set", vm, "Gold")
	sameFiles(t, "policy set Gold again", dirFiles(t, vm), enc)

	// A manager restart keeps the policy and the VM's policy.
	if err := stopPID(mpid); err != nil {
		t.Fatal(err)
	}
	mustRun(t, append([]string{"lab", "up", "--dir", dir}, labArgs...)...)
	if p := managerPolicies(t, msock)["Gold"]; !p.Encrypts || p.Provider != labProvider || p.VMs != 1 || p.Description != "PCI VMs" {
		t.Fatalf("Gold after a manager restart: %+v", p)
	}
	if rec := managerVMs(t, dir)[vm]; rec.Policy != "Gold" {
		t.Fatalf("VM after a manager restart: %+v", rec)
	}
	oneLineErr(t, "remove a policy in use after restart", vmcryptd(t, nil, nil, "manager", "policy", "remove", "Gold", "--manager-socket", msock), "in use by VM pvm")
	// So does a kill -9 of host1: its state keeps the VM's policy, and its
	// re-registration does not reset the manager's record.
	pidFile := filepath.Join(dir, "host1", "daemon.pid")
	syscall.Kill(readPID(pidFile), syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); alive(pidFile) && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	mustRun(t, append([]string{"lab", "up", "--dir", dir}, labArgs...)...)
	waitVM(t, h1, vm, "")
	if st := vmStatusJSON(t, h1, vm); st.Policy != "Gold" {
		t.Fatalf("after kill -9 of host1: policy %q", st.Policy)
	}
	if rec := managerVMs(t, dir)[vm]; rec.Policy != "Gold" {
		t.Fatalf("VM after kill -9 of host1: %+v", rec)
	}

	// Manager down: policy set fails clearly and changes nothing.
	if err := stopPID(mpid); err != nil {
		t.Fatal(err)
	}
	r := vmcryptd(t, nil, nil, "--socket", h1, "policy", "set", vm, mgrproto.PolicyDefault)
	oneLineErr(t, "policy set with the manager down", r, "manager unreachable")
	if !strings.Contains(r.err, "nothing was changed") {
		t.Errorf("policy set with the manager down does not say nothing was changed: %s", r.err)
	}
	t.Logf("policy set with the manager down: %s", strings.TrimSpace(r.err))
	oneLineErr(t, "policy list with the manager down", vmcryptd(t, nil, nil, "--socket", h1, "policy", "list"), "manager unreachable")
	sameFiles(t, "after policy set with the manager down", dirFiles(t, vm), enc)
	if st := vmStatusJSON(t, h1, vm); !st.Encrypted || st.Policy != "Gold" {
		t.Fatalf("after the failed policy set: encrypted %v, policy %q", st.Encrypted, st.Policy)
	}
	mustRun(t, append([]string{"lab", "up", "--dir", dir}, labArgs...)...)
	if rec := managerVMs(t, dir)[vm]; rec.Policy != "Gold" {
		t.Fatalf("VM after the outage: %+v", rec)
	}

	// A second provider on the manager (the same lab KMS under another
	// name) and a policy under it: policy set rekeys the VM onto a new
	// KEK of that provider, and the data stays.
	addr, err := os.ReadFile(filepath.Join(dir, "manager", "manager.addr"))
	if err != nil {
		t.Fatal(err)
	}
	if err := stopPID(mpid); err != nil {
		t.Fatal(err)
	}
	mcfgPath := filepath.Join(dir, "manager", "manager.toml")
	mcfg, err := manager.LoadConfig(mcfgPath)
	if err != nil {
		t.Fatal(err)
	}
	second := mcfg.KMS[0]
	second.Name = "lab2"
	mcfg.KMS = append(mcfg.KMS, second)
	mcfg.Listen = strings.TrimSpace(string(addr))
	if err := manager.WriteConfig(mcfgPath, mcfg); err != nil {
		t.Fatal(err)
	}
	os.Setenv(asMainEnv, "1")
	err = spawn(mustExe(t), filepath.Join(dir, "manager", "manager.log"), mpid, "manager", "serve", "--config", mcfgPath)
	os.Unsetenv(asMainEnv)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(15 * time.Second); vmcryptd(t, nil, nil, "--socket", msock, "status").code != 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("manager with two providers did not start")
		}
	}
	mustRun(t, "manager", "policy", "create", "Silver", "--encrypt", "--provider", "lab2", "--manager-socket", msock)
	mustRun(t, "--socket", h1, "policy", "set", vm, "Silver")
	st = vmStatusJSON(t, h1, vm)
	if !st.Encrypted || st.Policy != "Silver" || len(st.KEKs) != 1 || !strings.HasPrefix(st.KEKs[0], "lab2/") {
		t.Fatalf("after policy set Silver: encrypted %v, policy %q, keys %v", st.Encrypted, st.Policy, st.KEKs)
	}
	if got, err := viewReadWrite(t, h1, mp, "pvm", nil, len(data)); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("view of the VM under Silver reads other bytes (err %v)", err)
	}
	if rec := managerVMs(t, dir)[vm]; rec.Policy != "Silver" || len(rec.Keys) != 1 || !strings.HasPrefix(rec.Keys[0], "lab2/") {
		t.Fatalf("manager inventory after policy set Silver: %+v", rec)
	}
	if p := managerPolicies(t, msock); p["Gold"].VMs != 0 || p["Silver"].VMs != 1 {
		t.Fatalf("policy VM counts after the move: Gold %d, Silver %d", p["Gold"].VMs, p["Silver"].VMs)
	}

	// Datastore Default decrypts back to the original bytes; the VM
	// leaves the inventory and the policies may go.
	mustRun(t, "--socket", h1, "policy", "set", vm, mgrproto.PolicyDefault)
	sameFiles(t, "after policy set Datastore Default", dirFiles(t, vm), orig)
	if st := vmStatusJSON(t, h1, vm); st.Encrypted || st.Policy != mgrproto.PolicyDefault {
		t.Fatalf("after policy set Datastore Default: encrypted %v, policy %q", st.Encrypted, st.Policy)
	}
	if _, ok := managerVMs(t, dir)[vm]; ok {
		t.Fatal("the decrypted VM is still in the manager's inventory")
	}
	mustRun(t, "manager", "policy", "remove", "Gold", "--manager-socket", msock)
	mustRun(t, "manager", "policy", "remove", "Silver", "--manager-socket", msock)
	if p := managerPolicies(t, msock); len(p) != 3 {
		t.Fatalf("policies after removing Gold and Silver: %v", p)
	}
	oneLineErr(t, "policy set to a removed policy", vmcryptd(t, nil, nil, "--socket", h1, "policy", "set", vm, "Gold"), `no storage policy "Gold"`)

	audit, err := os.ReadFile(filepath.Join(dir, "manager", "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"op":"manager.policy.create"`, `"op":"manager.policy.remove","privilege":"Cryptographer.ManageEncryptionPolicy","result":"denied"`,
		`"op":"manager.policy.remove","privilege":"Cryptographer.ManageEncryptionPolicy","result":"ok"`, `"host":"host1","op":"host.get_policy"`} {
		if !strings.Contains(string(audit), want) {
			t.Errorf("manager audit log lacks %s", want)
		}
	}
}

// TestManagerPolicyDirectHostUnchanged: a direct-mode host (no manager)
// keeps its two built-in policies: policy list prints them as before,
// policy set encrypts and decrypts back to the same bytes, and an
// unknown name is refused naming the two.
func TestManagerPolicyDirectHostUnchanged(t *testing.T) {
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	want := fmt.Sprintf("%-22s %s\n%-22s %s\n", mgrproto.PolicyEncrypt, "VM files and disks encrypted at rest (XTS-AES-256 under per-VM and per-disk keys)", mgrproto.PolicyDefault, "no encryption")
	if out := mustRun(t, "--socket", sock, "policy", "list"); out != want {
		t.Fatalf("direct policy list:\n%q\nwant\n%q", out, want)
	}
	vm := filepath.Join(dir, "datastore", "dvm")
	mustRun(t, "--socket", sock, "vm", "create", "--name", "dvm", "--disk", "1M", vm)
	orig := dirFiles(t, vm)
	oneLineErr(t, "direct policy set Gold", vmcryptd(t, nil, nil, "--socket", sock, "policy", "set", vm, "Gold"), `unknown policy "Gold" (known: "VM Encryption Policy", "Datastore Default")`)
	mustRun(t, "--socket", sock, "policy", "set", vm, mgrproto.PolicyEncrypt)
	if st := vmStatusJSON(t, sock, vm); !st.Encrypted || st.Policy != mgrproto.PolicyEncrypt {
		t.Fatalf("direct policy set encrypt: encrypted %v, policy %q", st.Encrypted, st.Policy)
	}
	state, err := os.ReadFile(filepath.Join(dir, "state", "state.json"))
	if err != nil || !bytes.Contains(state, []byte(vm)) || bytes.Contains(state, []byte(`"policy"`)) {
		t.Errorf("a direct host's state should record the VM and no policy (%v):\n%s", err, state)
	}
	mustRun(t, "--socket", sock, "policy", "set", vm, mgrproto.PolicyDefault)
	sameFiles(t, "direct policy set back to Datastore Default", dirFiles(t, vm), orig)
}

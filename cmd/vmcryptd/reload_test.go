package main

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestReloadAndSIGHUP: `vmcryptd reload` applies a role added to the
// running daemon's config; a broken file is refused (line named) by the
// command and by SIGHUP alike, and the daemon keeps serving.
func TestReloadAndSIGHUP(t *testing.T) {
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	cfgPath := filepath.Join(dir, "vmcryptd.toml")
	orig, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if out := mustRun(t, "--socket", sock, "reload"); !strings.Contains(out, "nothing changed") {
		t.Fatalf("reload of the unchanged file: %q", out)
	}
	withRole := append(append([]byte{}, orig...), "\n[[roles]]\nuid = 65534\nrole = \"ReadOnly\"\n"...)
	if err := os.WriteFile(cfgPath, withRole, 0o600); err != nil {
		t.Fatal(err)
	}
	if out := mustRun(t, "--socket", sock, "reload"); !strings.Contains(out, "roles applied") {
		t.Fatalf("reload with a new role: %q", out)
	}
	broken := append(append([]byte{}, withRole...), "oops = [\n"...)
	if err := os.WriteFile(cfgPath, broken, 0o600); err != nil {
		t.Fatal(err)
	}
	line := strconv.Itoa(strings.Count(string(broken), "\n"))
	r := vmcryptd(t, nil, nil, "--socket", sock, "reload")
	if r.code == 0 || !strings.Contains(r.err, "running configuration kept") || !strings.Contains(r.err, "line ") {
		t.Fatalf("reload of a broken file: exit %d %q (file has %s lines)", r.code, r.err, line)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "daemon.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "daemon.log")
	deadline := time.Now().Add(10 * time.Second)
	for {
		log, _ := os.ReadFile(logPath)
		if strings.Contains(string(log), `"msg":"SIGHUP"`) && strings.Contains(string(log), "running configuration kept") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no SIGHUP refusal in the daemon log:\n%s", log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := os.WriteFile(cfgPath, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	// Still the same daemon, still serving; and the role removal applies.
	if st := labStatus(t, dir); st.PID != pid {
		t.Fatalf("daemon pid %d after SIGHUP, was %d", st.PID, pid)
	}
	if out := mustRun(t, "--socket", sock, "reload"); !strings.Contains(out, "roles applied") {
		t.Fatalf("reload back to the original: %q", out)
	}
	audit, _ := os.ReadFile(filepath.Join(dir, "audit.log"))
	if strings.Count(string(audit), `"op":"reload"`) < 4 {
		t.Errorf("audit log has %d reload entries, want 4:\n%s", strings.Count(string(audit), `"op":"reload"`), audit)
	}
}

// TestReloadDatastoresMountsMetrics: a reload adds a datastore (VMs can be
// made in it at once), a configured view of it (mounted by the reload,
// serving decrypted bytes) and a metrics listener; a reload that removes
// the datastore while its view is mounted is refused and changes nothing;
// removing both unmounts the view and drops the datastore, and the
// daemon is the same process throughout.
func TestReloadDatastoresMountsMetrics(t *testing.T) {
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	cfgPath := filepath.Join(dir, "vmcryptd.toml")
	orig, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	pid := labStatus(t, dir).PID
	ds2 := filepath.Join(dir, "ds2")
	mp := filepath.Join(t.TempDir(), "view2")
	if err := os.Mkdir(ds2, 0o700); err != nil {
		t.Fatal(err)
	}
	vm := filepath.Join(ds2, "vm2")
	if r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "create", vm, "--name", "vm2", "--encrypt"); r.code == 0 || !strings.Contains(r.err, "not inside a configured datastore") {
		t.Fatalf("vm create in an unconfigured datastore: exit %d %q", r.code, r.err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := ln.Addr().String()
	ln.Close()
	dsBlock := "\n[[datastores]]\nname = \"ds2\"\npath = \"" + ds2 + "\"\n"
	mountBlock := "\n[[mounts]]\ndatastore = \"ds2\"\nmountpoint = \"" + mp + "\"\n"
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(cfgPath, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	withMetrics := strings.Replace(string(orig), "metrics_listen = \"\"", "metrics_listen = \""+metricsAddr+"\"", 1)
	if withMetrics == string(orig) {
		t.Fatalf("lab config has no metrics_listen line:\n%s", orig)
	}
	// A datastore and metrics: both apply.
	write(withMetrics + dsBlock)
	out := mustRun(t, "--socket", sock, "reload")
	if !strings.Contains(out, "datastores, metrics_listen applied") || !strings.Contains(out, "datastore ds2 ("+ds2+") added") {
		t.Fatalf("reload adding a datastore: %q", out)
	}
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "vm2", "--disk", "4M", "--encrypt")
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatalf("metrics after reload: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "vmcryptd_keys_cached") {
		t.Fatalf("metrics after reload: %.200s", body)
	}
	// A configured view: mounted by the reload.
	write(withMetrics + dsBlock + mountBlock)
	if out := mustRun(t, "--socket", sock, "reload"); !strings.Contains(out, "mounts applied") || !strings.Contains(out, "mounted on "+mp) {
		t.Fatalf("reload adding a mount: %q", out)
	}
	plainNVRAM, err := os.ReadFile(filepath.Join(mp, "vm2", "vm2.nvram"))
	if err != nil {
		t.Fatalf("read through the reloaded view: %v", err)
	}
	atRest, err := os.ReadFile(filepath.Join(vm, "vm2.nvram"))
	if err != nil {
		t.Fatal(err)
	}
	if len(plainNVRAM) == 0 || bytes.Equal(plainNVRAM, atRest) || !bytes.HasPrefix(atRest, []byte("VMCRYPTD")) {
		t.Fatalf("view serves %d bytes (at rest %d, %q...): not the decrypted nvram", len(plainNVRAM), len(atRest), atRest[:min(8, len(atRest))])
	}
	// Removing the datastore while a view of it (here one mounted with
	// `vmcryptd mount`) stays: refused whole. The configured view, which
	// the file drops too and which the reload took down first, is back,
	// and the metrics listener it drops keeps serving.
	apiMP := filepath.Join(t.TempDir(), "apiview")
	mustRun(t, "--socket", sock, "mount", "ds2", apiMP)
	write(string(orig))
	r := vmcryptd(t, nil, nil, "--socket", sock, "reload")
	if r.code == 0 || !strings.Contains(r.err, "running configuration kept") || !strings.Contains(r.err, "the view on "+apiMP) || !strings.Contains(r.err, "outside every configured datastore") {
		t.Fatalf("reload removing a mounted datastore: exit %d %q", r.code, r.err)
	}
	if got, err := os.ReadFile(filepath.Join(mp, "vm2", "vm2.nvram")); err != nil || !bytes.Equal(got, plainNVRAM) {
		t.Fatalf("configured view after the refused reload: %v (%d bytes)", err, len(got))
	}
	if resp, err := http.Get("http://" + metricsAddr + "/metrics"); err != nil {
		t.Fatalf("metrics after the refused reload: %v", err)
	} else {
		resp.Body.Close()
	}
	mustRun(t, "--socket", sock, "unmount", apiMP)
	// A file open in the view: a reload that takes the view down is refused.
	f, err := os.Open(filepath.Join(mp, "vm2", "vm2.nvram"))
	if err != nil {
		t.Fatal(err)
	}
	write(string(orig))
	r = vmcryptd(t, nil, nil, "--socket", sock, "reload")
	f.Close()
	if r.code == 0 || !strings.Contains(r.err, "has open files") {
		t.Fatalf("reload unmounting a view in use: exit %d %q", r.code, r.err)
	}
	write(string(orig))
	out = mustRun(t, "--socket", sock, "reload")
	if !strings.Contains(out, "view on "+mp+" unmounted") || !strings.Contains(out, "datastore ds2 ("+ds2+") removed") {
		t.Fatalf("reload removing the mount and the datastore: %q", out)
	}
	if mounts, _ := os.ReadFile("/proc/mounts"); strings.Contains(string(mounts), mp) {
		t.Fatalf("%s still mounted after the reload removed it", mp)
	}
	if _, err := http.Get("http://" + metricsAddr + "/metrics"); err == nil {
		t.Fatalf("metrics still served on %s after the reload removed metrics_listen", metricsAddr)
	}
	if r := vmcryptd(t, nil, nil, "--socket", sock, "vm", "status", vm); r.code == 0 || !strings.Contains(r.err, "not inside a configured datastore") {
		t.Fatalf("vm status in a removed datastore: exit %d %q", r.code, r.err)
	}
	// Key providers: a second one (the same lab KMS under another name)
	// is added and serves keys; the lab provider, which holds the host
	// key, cannot be removed; the added one can.
	i := strings.Index(string(orig), "[[kms]]")
	j := strings.Index(string(orig), "[[datastores]]")
	second := strings.Replace(string(orig)[i:j], `name = "lab"`, `name = "lab2"`, 1)
	write(string(orig) + "\n" + second)
	if out := mustRun(t, "--socket", sock, "reload"); !strings.Contains(out, "kms applied") || !strings.Contains(out, "key provider lab2 added") {
		t.Fatalf("reload adding a provider: %q", out)
	}
	if out := mustRun(t, "--socket", sock, "key", "create", "--provider", "lab2"); !strings.Contains(out, "lab2") {
		t.Fatalf("key create on the reloaded provider: %q", out)
	}
	onlySecond := strings.Replace(string(orig)[:i], `default_provider = "lab"`, `default_provider = "lab2"`, 1) + second + string(orig)[j:]
	write(onlySecond)
	if r := vmcryptd(t, nil, nil, "--socket", sock, "reload"); r.code == 0 || !strings.Contains(r.err, `removes key provider "lab"`) {
		t.Fatalf("reload removing the provider of the host key: exit %d %q", r.code, r.err)
	}
	write(string(orig))
	if out := mustRun(t, "--socket", sock, "reload"); !strings.Contains(out, "key provider lab2 removed") {
		t.Fatalf("reload removing the added provider: %q", out)
	}
	if st := labStatus(t, dir); st.PID != pid {
		t.Fatalf("daemon pid %d, was %d: it restarted", st.PID, pid)
	}
}

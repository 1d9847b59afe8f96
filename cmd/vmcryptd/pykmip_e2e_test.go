package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/kms"
	"github.com/vmcryptd/vmcryptd/kms/kmstest"
)

// TestPyKMIPDaemon runs the daemon against a real pykmip-server, its only
// key provider: restart re-fetch, failover, outage and recovery, a revoked
// key. One PyKMIP serves every subtest (it is the slow part to start);
// each subtest has its own daemon, state and datastore. The outage subtest
// runs last as it stops and restarts PyKMIP.
func TestPyKMIPDaemon(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	needBin(t, "qemu-img")
	srv := kmstest.StartPyKMIP(t)

	// (a) A daemon restart loses every key from memory; it fetches the
	// host key and the VM's KEK again, by id, from PyKMIP.
	t.Run("restart refetches keys", func(t *testing.T) {
		d := newPKDaemon(t, srv.Config("pykmip"), "10s")
		d.start()
		he := d.enableHostEncryption()
		vm, want := makeVM(t, d.ds, "vm1")
		d.must("vm", "encrypt", vm)
		checkEncrypted(t, d, vm, want)

		getsBefore := countLog(t, srv.LogFile, "Processing operation: Get\n")
		pid := d.status().PID
		d.restart()
		st := d.waitStatus("VM unlocked and host key loaded after restart", 20*time.Second, func(st api.Status) bool {
			v, ok := vmState(st, vm)
			return ok && !v.Locked && st.HostEncryption.KeyLoaded
		})
		if st.PID == pid {
			t.Fatalf("daemon pid %d did not change across the restart", pid)
		}
		if st.HostEncryption.KeyID != he.KeyID || st.HostEncryption.Provider != "pykmip" {
			t.Fatalf("host key after restart: %+v, before %+v", st.HostEncryption, he)
		}
		// Nothing but PyKMIP can have given the keys back: it served a Get
		// for the host key and one for the VM's KEK since the restart.
		if gets := countLog(t, srv.LogFile, "Processing operation: Get\n"); gets < getsBefore+2 {
			t.Fatalf("PyKMIP served %d Get operations across the restart, want >= 2", gets-getsBefore)
		}

		d.must("vm", "decrypt", vm)
		checkRestored(t, vm, want)
		if v, ok := vmState(d.status(), vm); ok {
			t.Fatalf("decrypted VM still registered: %+v", v)
		}
	})

	// (b) The first server of the provider is dead: every operation fails
	// over to PyKMIP.
	t.Run("failover", func(t *testing.T) {
		cfg := srv.Config("pykmip")
		dead := deadLoopbackAddr(t)
		cfg.Servers = []string{dead, srv.Addr}
		d := newPKDaemon(t, cfg, "10s")
		d.start()
		d.enableHostEncryption()
		out := strings.TrimSpace(d.must("key", "create"))
		if !strings.HasPrefix(out, "pykmip/") {
			t.Fatalf("key create: %q", out)
		}
		vm, want := makeVM(t, d.ds, "vm2")
		d.must("vm", "encrypt", vm)
		checkEncrypted(t, d, vm, want)

		var ps []api.ProviderStatus
		raw := d.must("kms", "status", "--json")
		if err := json.Unmarshal([]byte(raw), &ps); err != nil {
			t.Fatalf("kms status --json: %v\n%s", err, raw)
		}
		if len(ps) != 1 || len(ps[0].Servers) != 2 {
			t.Fatalf("kms status: %s", raw)
		}
		if s := ps[0].Servers[0]; s.Address != dead || s.Reachable || s.Error == "" {
			t.Fatalf("dead server status: %+v", s)
		}
		if s := ps[0].Servers[1]; s.Address != srv.Addr || !s.TLSOK || !strings.Contains(s.Vendor, "PyKMIP") {
			t.Fatalf("PyKMIP server status: %+v", s)
		}
		d.must("vm", "decrypt", vm)
		checkRestored(t, vm, want)
	})

	// (d) KEKs revoked on the KMS behind the daemon's back (issue 11 item
	// 5): after a restart the VMs are unlocked with a warning; they
	// decrypt and rekey away from the revoked keys, and nothing wraps
	// under them.
	for _, tc := range revokeCases {
		t.Run("revoked key "+tc.state, func(t *testing.T) {
			revokedKEKCase(t, srv.Config("pykmip"), tc.reason, tc.state)
		})
	}

	// (c) PyKMIP down when the daemon starts: the VM is locked with a
	// reason naming the server; once PyKMIP is back on the same port the
	// retry loop unlocks it, without a daemon restart.
	t.Run("outage and recovery", func(t *testing.T) {
		t.Cleanup(func() {
			if err := srv.Start(); err != nil { // a failure half-way must not leave it down
				t.Error(err)
			}
		})
		d := newPKDaemon(t, srv.Config("pykmip"), "500ms")
		d.start()
		d.enableHostEncryption()
		vm, want := makeVM(t, d.ds, "vm3")
		d.must("vm", "encrypt", vm)
		checkEncrypted(t, d, vm, want)

		srv.Stop()
		d.restart()
		st := d.waitStatus("VM locked with a reason, host key error", 20*time.Second, func(st api.Status) bool {
			v, ok := vmState(st, vm)
			return ok && v.Locked && !strings.Contains(v.Reason, "not fetched yet") && st.HostEncryption.Error != ""
		})
		v, _ := vmState(st, vm)
		t.Logf("lock reason: %s", v.Reason)
		if !strings.Contains(v.Reason, "server "+srv.Addr) || !strings.Contains(v.Reason, kms.ErrUnreachable.Error()) {
			t.Fatalf("lock reason %q does not name server %s as unreachable", v.Reason, srv.Addr)
		}
		if he := st.HostEncryption; he.KeyLoaded || !strings.Contains(he.Error, srv.Addr) {
			t.Fatalf("host key with PyKMIP down: %+v", he)
		}
		// Stays locked while the KMS is down (retries fail, nothing else).
		time.Sleep(1200 * time.Millisecond)
		if v, _ := vmState(d.status(), vm); !v.Locked {
			t.Fatalf("VM unlocked with PyKMIP down: %+v", v)
		}

		pid := st.PID
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		st = d.waitStatus("VM unlocked once PyKMIP is back", 20*time.Second, func(st api.Status) bool {
			v, ok := vmState(st, vm)
			return ok && !v.Locked && st.HostEncryption.KeyLoaded
		})
		if st.PID != pid {
			t.Fatalf("daemon restarted (pid %d, was %d)", st.PID, pid)
		}
		if st.HostEncryption.Error != "" {
			t.Errorf("host key error left after recovery: %q", st.HostEncryption.Error)
		}
		d.must("vm", "decrypt", vm)
		checkRestored(t, vm, want)
	})
}

// pkDaemon is a daemon of one subtest, configured by a TOML file written
// here, in a short directory under /tmp (unix socket paths are limited to
// 108 bytes, t.TempDir's are long).
type pkDaemon struct {
	t    *testing.T
	dir  string
	ds   string // the datastore
	sock string
	cfg  string
	pid  string
	log  string
}

func newPKDaemon(t *testing.T, kc kms.Config, retry string) *pkDaemon {
	t.Helper()
	ds := t.TempDir()
	dir, err := os.MkdirTemp("/tmp", "vmc-pk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &pkDaemon{t: t, dir: dir, ds: ds, sock: filepath.Join(dir, "d.sock"), cfg: filepath.Join(dir, "vmcryptd.toml"),
		pid: filepath.Join(dir, "daemon.pid"), log: filepath.Join(dir, "daemon.log")}
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	servers := make([]string, len(kc.Servers))
	for i, s := range kc.Servers {
		servers[i] = q(s)
	}
	conf := strings.Join([]string{
		`socket = ` + q(d.sock),
		`state_dir = ` + q(filepath.Join(dir, "state")),
		`audit_log = ` + q(filepath.Join(dir, "audit.log")),
		`default_provider = ` + q(kc.Name),
		`key_retry_interval = ` + q(retry),
		``,
		`[[kms]]`,
		`name = ` + q(kc.Name),
		`servers = [` + strings.Join(servers, ", ") + `]`,
		`ca_file = ` + q(kc.CAFile),
		`cert_file = ` + q(kc.CertFile),
		`key_file = ` + q(kc.KeyFile),
		`timeout = ` + q(kc.Timeout.String()),
		`connect_timeout = ` + q(kc.ConnectTimeout.String()),
		`retry_backoff = ` + q(kc.RetryBackoff.String()),
		``,
		`[[datastores]]`,
		`name = "ds"`,
		`path = ` + q(ds),
	}, "\n") + "\n"
	if err := os.WriteFile(d.cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := stopPID(d.pid); err != nil {
			t.Errorf("stop daemon: %v", err)
		}
		if t.Failed() {
			log, _ := os.ReadFile(d.log)
			t.Logf("daemon log tail:\n%s", tailString(log, 3000))
		}
	})
	return d
}

func tailString(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func (d *pkDaemon) start() {
	d.t.Helper()
	startDaemon(d.t, d.log, d.pid, d.sock, d.cfg)
}

// restart stops the daemon with SIGTERM and starts it again.
func (d *pkDaemon) restart() {
	d.t.Helper()
	if err := stopPID(d.pid); err != nil {
		d.t.Fatal(err)
	}
	d.start()
}

// noExitSleep is the environment of the CLI and daemon processes: a
// -race binary otherwise sleeps 1 s in every successful exit (GORACE
// atexit_sleep_ms defaults to 1000), which would be most of this test's
// run time.
func noExitSleep() string {
	return "GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")
}

func (d *pkDaemon) run(args ...string) runResult {
	d.t.Helper()
	return vmcryptd(d.t, nil, []string{noExitSleep()}, append([]string{"--socket", d.sock}, args...)...)
}

func (d *pkDaemon) must(args ...string) string {
	d.t.Helper()
	r := d.run(args...)
	if r.code != 0 {
		d.t.Fatalf("vmcryptd %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.out, r.err)
	}
	return r.out
}

func (d *pkDaemon) status() api.Status {
	d.t.Helper()
	var st api.Status
	out := d.must("status", "--json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		d.t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st
}

// waitStatus polls status until ok or the timeout, which fails the test.
func (d *pkDaemon) waitStatus(what string, timeout time.Duration, ok func(api.Status) bool) api.Status {
	d.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := d.status()
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			raw, _ := json.MarshalIndent(st, "", "  ")
			d.t.Fatalf("%s: not within %v; status:\n%s", what, timeout, raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *pkDaemon) enableHostEncryption() api.HostEncryption {
	d.t.Helper()
	d.must("host", "encryption", "enable")
	he := d.status().HostEncryption
	if !he.Enabled || !he.KeyLoaded || he.KeyID == "" || he.Provider != "pykmip" {
		d.t.Fatalf("host encryption after enable: %+v", he)
	}
	return he
}

// vmState finds a VM in status by directory (the daemon records the path
// with symlinks resolved).
func vmState(st api.Status, dir string) (api.VMLockState, bool) {
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	}
	for _, v := range st.VMs {
		if v.Dir == dir {
			return v, true
		}
	}
	return api.VMLockState{}, false
}

// makeVM creates a small VM directory: a vmx, an nvram and a
// monolithicFlat disk (qemu-img) with random data and holes. It returns
// the directory and the hashes of its files.
func makeVM(t *testing.T, ds, name string) (string, map[string][32]byte) {
	t.Helper()
	vm := filepath.Join(ds, name)
	if err := os.MkdirAll(vm, 0o755); err != nil {
		t.Fatal(err)
	}
	runCmd(t, vm, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "disk.vmdk", "8M")
	f, err := os.OpenFile(filepath.Join(vm, "disk-flat.vmdk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for _, mib := range []int64{0, 1, 2, 6} {
		rand.Read(buf)
		if _, err := f.WriteAt(buf, mib<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	nvram := make([]byte, 8684)
	rand.Read(nvram)
	vmx := fmt.Sprintf("displayName = %q\nnvram = \"%s.nvram\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"disk.vmdk\"\n", name, name)
	for file, data := range map[string][]byte{name + ".nvram": nvram, name + ".vmx": []byte(vmx)} {
		if err := os.WriteFile(filepath.Join(vm, file), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return vm, hashFiles(t, vm)
}

// checkEncrypted: the daemon says the VM is encrypted and unlocked, and
// the data files no longer hold their plain bytes.
func checkEncrypted(t *testing.T, d *pkDaemon, vm string, plain map[string][32]byte) {
	t.Helper()
	var vs api.VMStatusReply
	out := d.must("vm", "status", vm, "--json")
	if err := json.Unmarshal([]byte(out), &vs); err != nil {
		t.Fatalf("vm status --json: %v\n%s", err, out)
	}
	if !vs.Encrypted || vs.Locked || vs.Interrupted != "" || len(vs.KEKs) == 0 {
		t.Fatalf("vm status after encrypt: %s", out)
	}
	now := hashFiles(t, vm)
	for _, f := range []string{"disk-flat.vmdk", filepath.Base(vm) + ".nvram"} {
		if now[f] == plain[f] {
			t.Errorf("%s unchanged by encryption", f)
		}
	}
}

// checkRestored: the VM's files are byte for byte what they were, and
// nothing else is left in its directory.
func checkRestored(t *testing.T, vm string, want map[string][32]byte) {
	t.Helper()
	got := hashFiles(t, vm)
	for name, h := range want {
		if g, ok := got[name]; !ok {
			t.Errorf("%s missing after decrypt", name)
		} else if g != h {
			t.Errorf("%s differs after decrypt", name)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("extra file %s left after decrypt", name)
		}
	}
}

// countLog counts the occurrences of s in a log file.
func countLog(t *testing.T, path, s string) int {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Count(raw, []byte(s))
}

// deadLoopbackAddr returns a loopback address nothing listens on.
func deadLoopbackAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

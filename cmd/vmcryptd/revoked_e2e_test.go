package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/kms"
	"github.com/vmcryptd/vmcryptd/kms/labkms"
)

// startLabKMS runs the embedded lab KMS in this process on loopback until
// the test ends, and returns a provider config that reaches it.
func startLabKMS(t *testing.T, name string) kms.Config {
	t.Helper()
	dir := t.TempDir()
	if err := labkms.Init(dir); err != nil {
		t.Fatal(err)
	}
	srv, err := labkms.Listen(dir, "127.0.0.1:0", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("lab kms close: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("lab kms serve: %v", err)
		}
	})
	cfg := labkms.PathsFor(dir).ProviderConfig(name, srv.Addr())
	cfg.Timeout, cfg.ConnectTimeout, cfg.RetryBackoff = 10*time.Second, 5*time.Second, 50*time.Millisecond
	return cfg
}

// TestRevokedKEKLab: issue 11 item 5 against the embedded lab KMS.
func TestRevokedKEKLab(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	needBin(t, "qemu-img")
	for _, tc := range revokeCases {
		t.Run(tc.state, func(t *testing.T) { revokedKEKCase(t, startLabKMS(t, "lab"), tc.reason, tc.state) })
	}
}

var revokeCases = []struct {
	reason kms.RevocationReason
	state  string
}{
	{kms.RevokeCessationOfOperation, "Deactivated"},
	{kms.RevokeKeyCompromise, "Compromised"},
}

// revokedKEKCase encrypts two VMs, revokes their KEKs on the KMS behind
// the daemon's back and restarts it: both VMs are unlocked with a warning
// naming the state; nothing may wrap under the revoked keys (vm encrypt,
// disk add, rekey onto them) and each refusal changes nothing; vm decrypt
// restores one VM byte for byte, and a shallow rekey moves the other onto
// an active key, after which it is an ordinary VM.
func revokedKEKCase(t *testing.T, cfg kms.Config, reason kms.RevocationReason, state string) {
	d := newPKDaemon(t, cfg, "10s")
	metrics := withMetrics(t, d)
	d.start()
	d.must("host", "encryption", "enable")
	vmA, wantA := makeVM(t, d.ds, "vma")
	vmB, wantB := makeVM(t, d.ds, "vmb")
	plain, wantPlain := makeVM(t, d.ds, "plain")
	d.must("vm", "encrypt", vmA)
	d.must("vm", "encrypt", vmB)
	checkEncrypted(t, d, vmA, wantA)
	checkEncrypted(t, d, vmB, wantB)
	keyOf := func(vm string) string {
		v, ok := vmState(d.status(), vm)
		if !ok || len(v.Keys) != 1 {
			t.Fatalf("VM %s keys: %+v", vm, v)
		}
		return v.Keys[0]
	}
	refA, refB := keyOf(vmA), keyOf(vmB)

	p, err := kms.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, ref := range []string{refA, refB} {
		if err := p.Revoke(ctx, strings.TrimPrefix(ref, cfg.Name+"/"), reason); err != nil {
			t.Fatal(err)
		}
	}

	d.restart()
	st := d.waitStatus("both VMs unlocked under their revoked keys", 20*time.Second, func(st api.Status) bool {
		a, okA := vmState(st, vmA)
		b, okB := vmState(st, vmB)
		return okA && okB && !a.Locked && !b.Locked && a.Warning != "" && b.Warning != ""
	})
	for vm, ref := range map[string]string{vmA: refA, vmB: refB} {
		v, _ := vmState(st, vm)
		if !strings.Contains(v.Warning, "key "+ref+" is "+state) {
			t.Errorf("status warning for %s: %q, want it to name %s and %s", vm, v.Warning, ref, state)
		}
	}
	if out := d.must("status"); !strings.Contains(out, "warning: VM ") || !strings.Contains(out, state) {
		t.Errorf("status shows no warning line:\n%s", out)
	}
	if out := d.must("vm", "status", vmA); !strings.Contains(out, "warning: key "+refA+" is "+state) {
		t.Errorf("vm status shows no warning line:\n%s", out)
	}
	if got := scrape(t, metrics, "vmcryptd_revoked_keys_in_use"); got != "2" {
		t.Errorf("vmcryptd_revoked_keys_in_use = %q, want 2", got)
	}
	audit, err := os.ReadFile(filepath.Join(d.dir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{refA, refB} {
		if !strings.Contains(string(audit), `"op":"key.load-revoked","target":"`+cfg.Name+`","key_ids":["`+ref+`"]`) {
			t.Errorf("audit log has no key.load-revoked line for %s:\n%s", ref, audit)
		}
	}

	// Nothing wraps a new DEK under a revoked key; each refusal is one
	// line naming the key and its state, and changes no file.
	wantMsg := "key " + refA + " is " + state + ": it may only unwrap; rekey the VM onto an active key"
	idA := strings.TrimPrefix(refA, cfg.Name+"/")
	for _, c := range []struct {
		name string
		dir  string
		args []string
	}{
		{"vm encrypt onto the revoked key", plain, []string{"vm", "encrypt", "--key-id", idA, plain}},
		{"disk add", vmA, []string{"disk", "add", "--size", "1M", vmA}},
		{"shallow rekey onto the revoked key", vmB, []string{"vm", "rekey", "--key-id", idA, vmB}},
	} {
		before := hashFiles(t, c.dir)
		r := d.run(c.args...)
		msg := strings.TrimSpace(r.err)
		if r.code == 0 {
			t.Errorf("%s succeeded: %s", c.name, r.out)
		} else if strings.Contains(msg, "\n") || !strings.Contains(msg, wantMsg) {
			t.Errorf("%s: error %q, want one line containing %q", c.name, msg, wantMsg)
		}
		after := hashFiles(t, c.dir)
		for name, h := range before {
			if after[name] != h {
				t.Errorf("%s changed %s", c.name, name)
			}
		}
		for name := range after {
			if _, ok := before[name]; !ok {
				t.Errorf("%s left %s", c.name, name)
			}
		}
	}
	if st, _ := vmState(d.status(), plain); st.Dir != "" {
		t.Errorf("refused vm encrypt registered the VM: %+v", st)
	}
	checkRestored(t, plain, wantPlain)

	checkRevokedView(t, d, vmA, wantA)

	// Decrypt under the revoked key: the VM is back, byte for byte.
	d.must("vm", "decrypt", vmA)
	checkRestored(t, vmA, wantA)

	// Shallow rekey away from the revoked key: an ordinary VM afterwards.
	d.must("vm", "rekey", vmB)
	refB2 := keyOf(vmB)
	if refB2 == refB {
		t.Fatalf("rekey kept key %s", refB)
	}
	if v, _ := vmState(d.status(), vmB); v.Locked || v.Warning != "" {
		t.Fatalf("after rekey: %+v", v)
	}
	d.must("disk", "add", "--size", "1M", vmB)
	d.restart()
	d.waitStatus("rekeyed VM unlocked without warning", 20*time.Second, func(st api.Status) bool {
		v, ok := vmState(st, vmB)
		return ok && !v.Locked && v.Warning == "" && !strings.Contains(v.Reason, "not fetched yet")
	})
	if got := scrape(t, metrics, "vmcryptd_revoked_keys_in_use"); got != "0" {
		t.Errorf("after the restart, vmcryptd_revoked_keys_in_use = %q, want 0", got)
	}
	d.must("vm", "decrypt", vmB)
	got := hashFiles(t, vmB)
	for name, h := range wantB {
		if name == "vmb.vmx" {
			continue // disk add above added the new disk's lines
		}
		if got[name] != h {
			t.Errorf("%s differs after rekey away from the revoked key and decrypt", name)
		}
	}
}

// checkRevokedView mounts the datastore's view: the files of a VM under a
// revoked KEK read back as the originals, and nothing new may be written
// under that key (opening one for writing, creating an nvram, a swap
// file or a disk: EROFS); no file of the VM changes.
func checkRevokedView(t *testing.T, d *pkDaemon, vm string, plain map[string][32]byte) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("/dev/fuse missing")
		}
		t.Log("/dev/fuse missing: view part skipped")
		return
	}
	before := hashFiles(t, vm)
	mp := filepath.Join(d.dir, "view")
	d.must("mount", "ds", mp)
	t.Cleanup(func() { d.run("unmount", "--force", mp) })
	view := filepath.Join(mp, filepath.Base(vm))
	name := filepath.Base(vm)
	for _, f := range []string{"disk-flat.vmdk", name + ".nvram"} {
		raw, err := os.ReadFile(filepath.Join(view, f))
		if err != nil {
			t.Fatalf("read %s through the view: %v", f, err)
		}
		if sha256.Sum256(raw) != plain[f] {
			t.Errorf("%s through the view differs from the original", f)
		}
	}
	// A reader holding the file open (its container then open read-only
	// in the view) must not change what a writer is told.
	reader, err := os.Open(filepath.Join(view, name+".nvram"))
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	if f, err := os.OpenFile(filepath.Join(view, name+".nvram"), os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) {
		if f != nil {
			f.Close()
		}
		t.Errorf("open for writing under a revoked key: %v, want EROFS", err)
	}
	for _, f := range []string{name + ".vswp", "new.vmdk"} {
		err := os.WriteFile(filepath.Join(view, f), []byte("x"), 0o600)
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("create %s under a revoked key: %v, want EROFS", f, err)
		}
	}
	reader.Close()
	d.must("unmount", mp)
	after := hashFiles(t, vm)
	for f, h := range before {
		if after[f] != h {
			t.Errorf("the view changed %s", f)
		}
	}
	for f := range after {
		if _, ok := before[f]; !ok {
			t.Errorf("the view left %s", f)
		}
	}
}

// withMetrics makes d serve /metrics on a free loopback port and returns
// its address.
func withMetrics(t *testing.T, d *pkDaemon) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	conf, err := os.ReadFile(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	conf = append([]byte(fmt.Sprintf("metrics_listen = %q\n", addr)), conf...)
	if err := os.WriteFile(d.cfg, conf, 0o600); err != nil {
		t.Fatal(err)
	}
	return addr
}

// scrape returns the value of an unlabelled series on the daemon's
// /metrics, or "" if it is absent.
func scrape(t *testing.T, addr, series string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

package main

import (
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

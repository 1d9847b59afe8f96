// Package packaging holds the tests of the install tree, the systemd
// unit and the Debian package (the files themselves are not Go).
package packaging

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

func needBin(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s not installed (make deps installs it)", name)
			}
			t.Skipf("%s not installed", name)
		}
	}
}

// run runs a command in the repository root and returns stdout; it fails
// the test on a non-zero exit, showing stderr.
func run(t *testing.T, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s\n%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// The tree make install lays out, relative to DESTDIR, for PREFIX=/usr/local.
var installTree = []struct {
	path string
	mode os.FileMode
}{
	{"usr/local/bin/vmcryptd", 0o755},
	{"usr/local/lib/systemd/system/vmcryptd.service", 0o644},
	{"usr/local/share/man/man8/vmcryptd.8.gz", 0o644},
	{"usr/local/share/bash-completion/completions/vmcryptd", 0o644},
	{"usr/local/share/zsh/site-functions/_vmcryptd", 0o644},
	{"usr/local/share/fish/vendor_completions.d/vmcryptd.fish", 0o644},
	{"etc/vmcryptd", os.ModeDir | 0o750},
	{"etc/vmcryptd/vmcryptd.toml", 0o644},
}

func TestMakeInstallLayout(t *testing.T) {
	needBin(t, "make", "gzip")
	dest := t.TempDir()
	run(t, nil, "make", "--no-print-directory", "install", "DESTDIR="+dest)
	var files []string
	filepath.Walk(dest, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			rel, _ := filepath.Rel(dest, p)
			files = append(files, rel)
		}
		return nil
	})
	for _, want := range installTree {
		fi, err := os.Stat(filepath.Join(dest, want.path))
		if err != nil {
			t.Errorf("missing %s", want.path)
			continue
		}
		if fi.Mode() != want.mode {
			t.Errorf("%s: mode %v, want %v", want.path, fi.Mode(), want.mode)
		}
	}
	if n := len(installTree) - 1; len(files) != n {
		t.Errorf("installed %d files, want %d: %v", len(files), n, files)
	}
	unit, _ := os.ReadFile(filepath.Join(dest, "usr/local/lib/systemd/system/vmcryptd.service"))
	if !strings.Contains(string(unit), "ExecStart=/usr/local/bin/vmcryptd serve --config /etc/vmcryptd/vmcryptd.toml\n") ||
		strings.Contains(string(unit), "@") && regexp.MustCompile(`@[A-Z]+@`).Match(unit) {
		t.Errorf("unit paths not filled in:\n%s", unit)
	}
	out, err := exec.Command(filepath.Join(dest, "usr/local/bin/vmcryptd"), "version").Output()
	if err != nil || !strings.HasPrefix(string(out), "vmcryptd ") || strings.TrimSpace(string(out)) == "vmcryptd dev" {
		t.Errorf("installed binary: %q %v (want the git version)", out, err)
	}

	// A second install keeps the administrator's config and says where
	// the new example went.
	cfg := filepath.Join(dest, "etc/vmcryptd/vmcryptd.toml")
	mine := []byte("# edited by the administrator\n")
	if err := os.WriteFile(cfg, mine, 0o600); err != nil {
		t.Fatal(err)
	}
	msg := run(t, nil, "make", "--no-print-directory", "install", "DESTDIR="+dest)
	if got, _ := os.ReadFile(cfg); !bytes.Equal(got, mine) {
		t.Fatal("make install overwrote an existing config")
	}
	if _, err := os.Stat(cfg + ".example"); err != nil || !strings.Contains(msg, "keeping existing") {
		t.Errorf("no example beside the kept config: %v\n%s", err, msg)
	}
}

// installPrefix installs into a fresh PREFIX with no DESTDIR, so the
// unit names real paths that systemd-analyze can check.
func installPrefix(t *testing.T) (prefix, unit string) {
	t.Helper()
	prefix = t.TempDir()
	run(t, nil, "make", "--no-print-directory", "install", "PREFIX="+prefix, "SYSCONFDIR="+prefix+"/etc")
	return prefix, filepath.Join(prefix, "lib/systemd/system/vmcryptd.service")
}

func TestSystemdUnitVerify(t *testing.T) {
	needBin(t, "make", "systemd-analyze", "man")
	prefix, unit := installPrefix(t)
	cmd := exec.Command("systemd-analyze", "verify", unit)
	cmd.Env = append(os.Environ(), "MANPATH="+filepath.Join(prefix, "share/man"))
	if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	out := run(t, nil, "systemd-analyze", "security", "--offline=true", "--no-pager", unit)
	m := regexp.MustCompile(`Overall exposure level for vmcryptd\.service: ([0-9.]+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure score in:\n%s", out)
	}
	score, _ := strconv.ParseFloat(m[1], 64)
	t.Logf("systemd-analyze security exposure: %.1f", score)
	// 4.6 when written; a change that weakens the unit past "OK" fails.
	if score > 5.0 {
		t.Errorf("exposure %.1f, want at most 5.0\n%s", score, out)
	}
}

// TestSystemdUnitDirectives checks the unit says what the daemon needs,
// avoids what would hide its views from the host, and justifies every
// directive of its [Service] section in a comment.
func TestSystemdUnitDirectives(t *testing.T) {
	raw, err := os.ReadFile("systemd/vmcryptd.service.in")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(raw)
	for _, want := range []string{
		"Type=notify\n", "ExecReload=/bin/kill -HUP $MAINPID\n", "LimitMEMLOCK=infinity\n",
		"RuntimeDirectory=vmcryptd\n", "StateDirectory=vmcryptd\n", "LogsDirectory=vmcryptd\n",
		"NoNewPrivileges=yes\n", "DeviceAllow=/dev/fuse rw\n", "SystemCallFilter=@system-service @mount\n",
		"ProtectClock=yes\n", "ProtectHostname=yes\n",
	} {
		if !strings.Contains(unit, "\n"+want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	// Each of these puts the service in its own mount namespace, from
	// which FUSE mounts do not propagate to the host (systemd.exec(5)).
	for _, bad := range []string{"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths",
		"ReadOnlyPaths", "InaccessiblePaths", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
		"ProtectControlGroups", "ProtectProc", "ProcSubset", "PrivateMounts", "MountFlags", "BindPaths", "TemporaryFileSystem",
		"DynamicUser"} {
		if regexp.MustCompile(`(?m)^` + bad + `=`).MatchString(unit) {
			t.Errorf("unit sets %s=, which would hide the views from the host", bad)
		}
	}
	_, service, _ := strings.Cut(unit, "\n[Service]\n")
	service, _, _ = strings.Cut(service, "\n[Install]")
	commented := false
	for _, line := range strings.Split(service, "\n") {
		switch {
		case strings.HasPrefix(line, "#"):
			commented = true
		case line == "":
			commented = false
		case !commented:
			t.Errorf("directive without a justifying comment: %s", line)
		}
	}
}

func TestDebPackage(t *testing.T) {
	needBin(t, "make", "dpkg-deb", "dpkg", "gzip")
	out := t.TempDir()
	deb := strings.TrimSpace(lastLine(run(t, nil, "make", "--no-print-directory", "deb", "DEBDIR="+out)))
	if !strings.HasPrefix(deb, out+"/vmcryptd_") || !strings.HasSuffix(deb, ".deb") {
		t.Fatalf("make deb printed %q", deb)
	}
	info := run(t, nil, "dpkg-deb", "--info", deb)
	for _, want := range []string{"Package: vmcryptd", "Depends: fuse3, procps", " conffiles", " postinst"} {
		if !strings.Contains(info, want) {
			t.Errorf("dpkg-deb --info lacks %q:\n%s", want, info)
		}
	}
	contents := run(t, nil, "dpkg-deb", "--contents", deb)
	for _, want := range []string{"./usr/bin/vmcryptd", "./usr/lib/systemd/system/vmcryptd.service",
		"./usr/share/man/man8/vmcryptd.8.gz", "./usr/share/bash-completion/completions/vmcryptd",
		"./usr/share/zsh/vendor-completions/_vmcryptd", "./usr/share/fish/vendor_completions.d/vmcryptd.fish",
		"./etc/vmcryptd/vmcryptd.toml"} {
		if !strings.Contains(contents, want+"\n") {
			t.Errorf("package lacks %s", want)
		}
	}
	if conf := run(t, nil, "dpkg-deb", "--info", deb, "conffiles"); conf != "/etc/vmcryptd/vmcryptd.toml\n" {
		t.Errorf("conffiles = %q", conf)
	}
	ver := strings.TrimSpace(run(t, nil, "dpkg-deb", "--field", deb, "Version"))
	gitver := strings.TrimSpace(run(t, nil, "git", "describe", "--tags", "--always", "--dirty"))
	if !strings.Contains(ver, strings.TrimPrefix(strings.SplitN(gitver, "-", 2)[0], "v")) {
		t.Errorf("package version %q does not come from git describe %q", ver, gitver)
	}

	// Install it on this machine, run it, and remove every trace again.
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("dpkg -i needs root")
		}
		t.Skip("dpkg -i needs root")
	}
	if exec.Command("dpkg-query", "-W", "vmcryptd").Run() == nil {
		t.Fatal("a vmcryptd package is already installed here; refusing to replace it")
	}
	for _, p := range []string{"/usr/bin/vmcryptd", "/etc/vmcryptd"} {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("%s exists outside any package; refusing to install over it", p)
		}
	}
	t.Cleanup(func() {
		if out, err := exec.Command("dpkg", "--purge", "vmcryptd").CombinedOutput(); err != nil {
			t.Errorf("dpkg --purge: %v\n%s", err, out)
		}
		for _, p := range []string{"/usr/bin/vmcryptd", "/etc/vmcryptd", "/usr/lib/systemd/system/vmcryptd.service"} {
			if _, err := os.Stat(p); err == nil {
				t.Errorf("%s left behind after purge", p)
			}
		}
	})
	run(t, []string{"DEBIAN_FRONTEND=noninteractive"}, "dpkg", "-i", deb)
	got := run(t, nil, "/usr/bin/vmcryptd", "version")
	if got != "vmcryptd "+gitver+"\n" {
		t.Errorf("/usr/bin/vmcryptd version = %q, want %q", got, "vmcryptd "+gitver)
	}
	if st := run(t, nil, "dpkg-query", "-W", "-f", "${Status}", "vmcryptd"); st != "install ok installed" {
		t.Errorf("dpkg status %q", st)
	}
	// The man page and completion are where man and bash look.
	if page := run(t, []string{"MANWIDTH=80"}, "man", "-P", "cat", "8", "vmcryptd"); !strings.Contains(page, "vmcryptd serve") {
		t.Errorf("man 8 vmcryptd does not show the page")
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

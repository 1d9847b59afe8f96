package main

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io/fs"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/kms"
	"github.com/vmcryptd/vmcryptd/kms/labkms"
)

// The test binary doubles as the vmcryptd binary: with this variable set it
// runs main() instead of the tests, so `lab up` can spawn "itself" and
// tests exercise the real CLI, daemon and lab KMS as separate processes.
const asMainEnv = "VMCRYPTD_TEST_AS_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(asMainEnv) == "1" {
		main()
		os.Exit(0)
	}
	if spec := os.Getenv(crashWriterEnv); spec != "" {
		crashWriter(spec)
		os.Exit(0)
	}
	// Race-enabled children otherwise sleep 1 s at exit; every CLI call
	// and daemon in these tests is such a child.
	if os.Getenv("GORACE") == "" {
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	// testscript runs m and serves "vmcryptd" to the transcripts in
	// testdata/script as this test binary.
	testscript.Main(m, map[string]func(){"vmcryptd": main})
}

type runResult struct {
	out  string
	err  string
	code int
}

// vmcryptd runs the CLI as a subprocess. cred != nil runs it as another uid.
func vmcryptd(t *testing.T, cred *syscall.Credential, env []string, args ...string) runResult {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if cred != nil {
		self = exeFor(t, cred)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Env = append(append(os.Environ(), asMainEnv+"=1"), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	err = cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run vmcryptd %v: %v", args, err)
	}
	return runResult{stdout.String(), stderr.String(), code}
}

// exeFor returns a copy of the test binary that another uid can execute
// (the build cache directory is private to root).
func exeFor(t *testing.T, cred *syscall.Credential) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmcryptd-exe-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	self, _ := os.Executable()
	raw, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "vmcryptd.test")
	if err := os.WriteFile(dst, raw, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// startDaemon starts a daemon from the test binary, detached as `lab up`
// does, and waits until it answers on sock; on failure it shows the tail
// of the daemon's log.
func startDaemon(t testing.TB, logPath, pidPath, sock, cfgPath string) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	os.Setenv(asMainEnv, "1") // spawn passes this process's environment on
	err = spawn(self, logPath, pidPath, "--socket", sock, "serve", "--config", cfgPath)
	os.Unsetenv(asMainEnv)
	if err != nil {
		t.Fatal(err)
	}
	if err := waitDaemon(&globals{socket: sock}, 15*time.Second); err != nil {
		log, _ := os.ReadFile(logPath)
		if len(log) > 2000 {
			log = log[len(log)-2000:]
		}
		t.Fatalf("daemon did not start: %v\n%s", err, log)
	}
}

func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	r := vmcryptd(t, nil, nil, args...)
	if r.code != 0 {
		t.Fatalf("vmcryptd %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.out, r.err)
	}
	return r.out
}

// startLab brings a lab up in a fresh directory and always takes it down.
func startLab(t *testing.T, extra ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := t.TempDir()
	t.Cleanup(func() {
		r := vmcryptd(t, nil, nil, "lab", "down", "--dir", dir)
		if r.code != 0 {
			t.Errorf("lab down: %s", r.err)
		}
	})
	mustRun(t, append([]string{"lab", "up", "--dir", dir}, extra...)...)
	return dir
}

func labStatus(t *testing.T, dir string) api.Status {
	t.Helper()
	var st api.Status
	out := mustRun(t, "--socket", filepath.Join(dir, "vmcryptd.sock"), "status", "--json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st
}

func TestLabRestartRefetchesKeys(t *testing.T) {
	dir := startLab(t)
	st := labStatus(t, dir)
	he := st.HostEncryption
	if !he.Enabled || !he.KeyLoaded || he.KeyID == "" {
		t.Fatalf("after lab up: %+v", he)
	}
	env, err := os.ReadFile(filepath.Join(dir, "lab.env"))
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"VMCRYPTD_SOCKET", "VMCRYPTD_KMS_ADDR", "VMCRYPTD_KMS_CA", "VMCRYPTD_KMS_CLIENT_CERT", "VMCRYPTD_KMS_CLIENT_KEY"} {
		if !strings.Contains(string(env), "export "+v+"=") {
			t.Errorf("lab.env lacks %s", v)
		}
	}
	mustRun(t, "lab", "down", "--dir", dir)
	for _, pid := range []string{"daemon.pid", "kms.pid"} {
		if alive(filepath.Join(dir, pid)) {
			t.Fatalf("%s still running after lab down", pid)
		}
	}
	// Same keys after a restart: the daemon fetched the host KEK by id.
	mustRun(t, "lab", "up", "--dir", dir)
	// The daemon fetches keys in the background after it starts serving.
	st2 := labStatus(t, dir)
	for deadline := time.Now().Add(15 * time.Second); !st2.HostEncryption.KeyLoaded && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		st2 = labStatus(t, dir)
	}
	if st2.HostEncryption.KeyID != he.KeyID || !st2.HostEncryption.KeyLoaded || st2.PID == st.PID {
		t.Fatalf("after restart: %+v (pid %d, before %d)", st2.HostEncryption, st2.PID, st.PID)
	}
}

// The KMS goes away: cached keys keep serving; a restarted daemon reports
// the key as not loaded with the reason, and picks it up once the KMS is
// back.
func TestKMSOutageAndRecovery(t *testing.T) {
	dir := startLab(t, "--key-retry", "500ms")
	sock := filepath.Join(dir, "vmcryptd.sock")
	if err := stopPID(filepath.Join(dir, "kms.pid")); err != nil {
		t.Fatal(err)
	}
	st := labStatus(t, dir)
	if !st.HostEncryption.KeyLoaded {
		t.Fatal("cached host key lost when the KMS went down")
	}
	r := vmcryptd(t, nil, nil, "--socket", sock, "kms", "status", "--json")
	var ps []api.ProviderStatus
	if r.code != 0 || json.Unmarshal([]byte(r.out), &ps) != nil || len(ps) != 1 || ps[0].Servers[0].Reachable || ps[0].Servers[0].Error == "" {
		t.Fatalf("kms status with the KMS down: %+v %s", ps, r.err)
	}
	// Restart only the daemon: the key is gone from memory and cannot be had.
	if err := stopPID(filepath.Join(dir, "daemon.pid")); err != nil {
		t.Fatal(err)
	}
	startDaemon(t, filepath.Join(dir, "daemon.log"), filepath.Join(dir, "daemon.pid"), sock, filepath.Join(dir, "vmcryptd.toml"))
	var he api.HostEncryption
	deadline := time.Now().Add(20 * time.Second)
	for {
		he = labStatus(t, dir).HostEncryption
		if he.Error != "" || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if he.KeyLoaded || !strings.Contains(he.Error, "127.0.0.1") {
		t.Fatalf("with the KMS down after restart: %+v (want not loaded, error naming the server)", he)
	}
	// KMS back on the same port (lab up reuses it): the retry loop loads the key.
	mustRun(t, "lab", "up", "--dir", dir)
	deadline = time.Now().Add(20 * time.Second)
	for !labStatus(t, dir).HostEncryption.KeyLoaded {
		if time.Now().After(deadline) {
			t.Fatal("host key not loaded after the KMS came back")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestRolesAndAudit(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := startLab(t)
	// A second daemon on the lab KMS, with roles and a socket the test
	// users can reach.
	base, err := os.MkdirTemp("", "vmcryptd-roles-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	sock := filepath.Join(base, "run", "vmcryptd.sock")
	kmsAddr, _ := os.ReadFile(filepath.Join(dir, "kms.addr"))
	p := labkms.PathsFor(filepath.Join(dir, "kms"))
	cfg := strings.Join([]string{
		`socket = "` + sock + `"`,
		`socket_group = "65534"`,
		`state_dir = "` + filepath.Join(base, "state") + `"`,
		`audit_log = "` + filepath.Join(base, "audit.log") + `"`,
		`[[kms]]`,
		`name = "lab"`,
		`servers = ["` + strings.TrimSpace(string(kmsAddr)) + `"]`,
		`ca_file = "` + p.CACert + `"`,
		`cert_file = "` + p.ClientCert + `"`,
		`key_file = "` + p.ClientKey + `"`,
		`[[roles]]`,
		`uid = 65534`,
		`role = "NoCryptoAdmin"`,
		`[[roles]]`,
		`uid = 65532`,
		`role = "ReadOnly"`,
	}, "\n") + "\n"
	cfgPath := filepath.Join(base, "vmcryptd.toml")
	os.WriteFile(cfgPath, []byte(cfg), 0o600)
	t.Cleanup(func() { stopPID(filepath.Join(base, "daemon.pid")) })
	startDaemon(t, filepath.Join(base, "daemon.log"), filepath.Join(base, "daemon.pid"), sock, cfgPath)

	// Copies of the lab client files the refused 'kms add' names (the CLI
	// checks they exist before it asks the daemon).
	for _, f := range []string{p.CACert, p.ClientCert, p.ClientKey} {
		raw, _ := os.ReadFile(f)
		os.WriteFile(filepath.Join(base, filepath.Base(f)), raw, 0o644)
	}
	pub := labkms.PathsFor(base)
	vmDir := filepath.Join(base, "vm")
	os.MkdirAll(vmDir, 0o755)
	os.WriteFile(filepath.Join(vmDir, "vm.vmx"), []byte("displayName = \"vm\"\nnvram = \"vm.nvram\"\n"), 0o644)
	os.WriteFile(filepath.Join(vmDir, "vm.nvram"), []byte("MRVN"), 0o644)
	nocrypto := &syscall.Credential{Uid: 65534, Gid: 65534}
	norole := &syscall.Credential{Uid: 65533, Gid: 65534}
	sockArg := []string{"--socket", sock}
	tests := []struct {
		name     string
		cred     *syscall.Credential
		args     []string
		wantOK   bool
		wantPriv string
	}{
		{"status allowed", nocrypto, []string{"status"}, true, ""},
		{"kms list allowed", nocrypto, []string{"kms", "list"}, true, ""},
		{"host encryption refused", nocrypto, []string{"host", "encryption", "enable"}, false, "Cryptographer.RegisterHost"},
		{"key create refused", nocrypto, []string{"key", "create"}, false, "Cryptographer.ManageKeys"},
		{"kms add refused", nocrypto, []string{"kms", "add", "x", "--server", "127.0.0.1:1", "--ca", pub.CACert, "--cert", pub.ClientCert, "--key", pub.ClientKey}, false, "Cryptographer.ManageKeyServers"},
		{"kms remove refused", nocrypto, []string{"kms", "remove", "lab"}, false, "Cryptographer.ManageKeyServers"},
		{"vm status allowed", nocrypto, []string{"vm", "status", vmDir}, true, ""},
		{"vm encrypt refused", nocrypto, []string{"vm", "encrypt", vmDir}, false, "Cryptographer.Encrypt"},
		{"vm decrypt refused", nocrypto, []string{"vm", "decrypt", vmDir}, false, "Cryptographer.Decrypt"},
		{"vm rekey refused", nocrypto, []string{"vm", "rekey", vmDir}, false, "Cryptographer.Recrypt"},
		{"disk restore-keys refused", nocrypto, []string{"disk", "restore-keys", vmDir, "vm.vmdk"}, false, "Cryptographer.AddDisk"},
		{"policy set refused", nocrypto, []string{"policy", "set", vmDir, "VM Encryption Policy"}, false, "Cryptographer.ManageEncryptionPolicy"},
		{"encrypted vm create refused", nocrypto, []string{"vm", "create", filepath.Join(base, "new"), "--name", "new", "--encrypt"}, false, "Cryptographer.EncryptNew"},
		{"vm check allowed", nocrypto, []string{"vm", "check", vmDir}, true, ""},
		{"vm check --repair refused", nocrypto, []string{"vm", "check", "--repair", vmDir}, false, "Cryptographer.Recrypt"},
		{"no role refused", norole, []string{"status"}, false, "System.Read"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := vmcryptd(t, tt.cred, nil, append(sockArg, tt.args...)...)
			if tt.wantOK {
				if r.code != 0 {
					t.Fatalf("exit %d: %s", r.code, r.err)
				}
				return
			}
			if r.code != exitDenied {
				t.Fatalf("exit %d, want %d (denied): %s %s", r.code, exitDenied, r.out, r.err)
			}
			if !strings.Contains(r.err, "permission denied") {
				t.Fatalf("stderr %q does not say permission denied", r.err)
			}
			if tt.cred == nocrypto && !strings.Contains(r.err, tt.wantPriv) {
				t.Fatalf("stderr %q does not name %s", r.err, tt.wantPriv)
			}
		})
	}
	// Root (Administrator) may.
	out := mustRun(t, append(sockArg, "key", "create")...)
	if !strings.HasPrefix(out, "lab/") {
		t.Fatalf("key create: %q", out)
	}
	audit, err := os.ReadFile(filepath.Join(base, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	var denied, ok int
	for _, line := range strings.Split(strings.TrimSpace(string(audit)), "\n") {
		var e struct {
			UID    int    `json:"uid"`
			Op     string `json:"op"`
			Result string `json:"result"`
		}
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		switch {
		case e.Result == "denied" && (e.UID == 65534 || e.UID == 65533):
			denied++
		case e.Result == "ok" && e.Op == "key.create" && e.UID == 0:
			ok++
		}
	}
	wantDenied := 0
	for _, tt := range tests {
		if !tt.wantOK {
			wantDenied++
		}
	}
	if denied != wantDenied || ok != 1 {
		t.Fatalf("audit log: %d denials (want %d), %d key.create ok (want 1):\n%s", denied, wantDenied, ok, audit)
	}
}

// Malformed and oversized requests get 400 and leave the daemon working.
func TestBadRequests(t *testing.T) {
	dir := startLab(t)
	c := api.NewClient(filepath.Join(dir, "vmcryptd.sock"))
	ctx := context.Background()
	for name, body := range map[string]any{
		"unknown field": map[string]any{"enable": true, "bogus": 1},
		"wrong type":    map[string]any{"enable": "yes"},
		"oversized":     map[string]any{"provider": strings.Repeat("x", api.MaxRequestBytes+10)},
	} {
		err := c.Do(ctx, "POST", "/host/encryption", body, nil)
		var se *api.StatusError
		if !errorsAs(err, &se) || se.Code != 400 {
			t.Errorf("%s: err = %v, want 400", name, err)
		}
	}
	if err := c.Do(ctx, "GET", "/no/such/thing", nil, nil); err == nil {
		t.Error("unknown endpoint answered 2xx")
	}
	labStatus(t, dir) // still serving
}

// No KEK byte sequence (raw, hex or base64) may appear in any file the
// lab wrote: state, audit log, config, logs, datastore, KMS store.
func TestNoKeyMaterialInFiles(t *testing.T) {
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	created := strings.TrimSpace(mustRun(t, "--socket", sock, "key", "create"))
	host := labStatus(t, dir).HostEncryption
	kmsAddr, _ := os.ReadFile(filepath.Join(dir, "kms.addr"))
	prov, err := kms.New(labkms.PathsFor(filepath.Join(dir, "kms")).ProviderConfig("lab", strings.TrimSpace(string(kmsAddr))), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer prov.Close()
	var secrets [][]byte
	for _, id := range []string{host.KeyID, strings.TrimPrefix(created, "lab/")} {
		k, err := prov.GetKey(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		secrets = append(secrets, k, []byte(hex.EncodeToString(k)), []byte(strings.ToUpper(hex.EncodeToString(k))),
			[]byte(base64.StdEncoding.EncodeToString(k)), []byte(base64.RawURLEncoding.EncodeToString(k)))
	}
	// An encrypted VM: its plain DEKs (unwrapped here from the keySafes
	// with the KEK, per docs/FORMAT.md) must not appear anywhere either.
	vm := filepath.Join(dir, "datastore", "secretvm")
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "secretvm", "--disk", "8M", "--encrypt")
	vmxText, _ := os.ReadFile(filepath.Join(vm, "secretvm.vmx"))
	descText, _ := os.ReadFile(filepath.Join(vm, "secretvm.vmdk"))
	vmID := kvValue(string(vmxText), "vmcryptd.vmId")
	diskID := kvValue(string(descText), "ddb.vmcryptd.diskId")
	for _, c := range []struct{ ks, purpose, owner string }{
		{kvValue(string(vmxText), "encryption.keySafe"), "vm", vmID},
		{kvValue(string(descText), "encryptionKeys"), "disk", diskID},
	} {
		dek := unwrapForTest(t, prov, c.ks, c.purpose, c.owner)
		secrets = append(secrets, dek, dek[:32], dek[32:], []byte(hex.EncodeToString(dek)), []byte(base64.StdEncoding.EncodeToString(dek)))
	}
	// Restart so the daemon's shutdown path also runs before we look.
	mustRun(t, "lab", "down", "--dir", dir)
	mustRun(t, "lab", "up", "--dir", dir)
	files := 0
	filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		files++
		for _, s := range secrets {
			if bytes.Contains(raw, s) {
				t.Errorf("%s contains key material", path)
			}
		}
		return nil
	})
	if files < 8 {
		t.Fatalf("only %d files scanned", files)
	}
}

// kvValue returns the value of `key = "value"` (vmx) or `key="value"`
// (descriptor) in text.
func kvValue(text, key string) string {
	for _, l := range strings.Split(text, "\n") {
		k, v, ok := strings.Cut(l, "=")
		if ok && strings.TrimSpace(k) == key {
			return strings.Trim(strings.TrimSpace(v), `"`)
		}
	}
	return ""
}

// unwrapForTest unwraps a keySafe's DEK following docs/FORMAT.md 2.1,
// independently of the engine, fetching the KEK from the lab KMS.
func unwrapForTest(t *testing.T, prov *kms.Provider, ks, purpose, owner string) []byte {
	t.Helper()
	inner := strings.TrimSuffix(strings.TrimPrefix(ks, "vmware:key/list/(pair/("), "))")
	parts := strings.Split(inner, ",")
	loc := strings.Split(parts[0], "/")
	unesc := func(s string) string {
		u, err := url.PathUnescape(s)
		if err != nil {
			t.Fatal(err)
		}
		return u
	}
	provider, keyID := unesc(loc[2]), unesc(loc[3])
	locked, err := base64.StdEncoding.DecodeString(unesc(parts[2]))
	if err != nil || len(locked) != 113 {
		t.Fatalf("keySafe %q: %v", ks, err)
	}
	kek, err := prov.GetKey(context.Background(), keyID)
	if err != nil {
		t.Fatal(err)
	}
	wk, _ := hkdf.Key(sha256.New, kek, locked[1:33], "vmcryptd v1 dek-wrap", 32)
	block, _ := aes.NewCipher(wk)
	gcm, _ := cipher.NewGCM(block)
	ad := []byte("vmcryptd v1 wrapped-dek")
	for _, f := range []string{purpose, owner, provider, keyID} {
		ad = append(ad, byte(len(f)>>8), byte(len(f)))
		ad = append(ad, f...)
	}
	dek, err := gcm.Open(nil, make([]byte, 12), locked[33:], ad)
	if err != nil {
		t.Fatalf("unwrap %s DEK: %v", purpose, err)
	}
	return dek
}

// Shallow rekey, then a daemon restart (the new KEK is fetched by id),
// then decrypt: the VM comes back byte for byte.
func TestRekeyRestartDecrypt(t *testing.T) {
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	vm := filepath.Join(dir, "datastore", "rkvm")
	os.MkdirAll(vm, 0o755)
	os.WriteFile(filepath.Join(vm, "rkvm.vmx"), []byte("displayName = \"rkvm\"\nnvram = \"rkvm.nvram\"\nsched.swap.derivedName = \"rkvm.vswp\"\nguestinfo.token = \"abc\"\n"), 0o644)
	nv := bytes.Repeat([]byte("nvram "), 1500)
	os.WriteFile(filepath.Join(vm, "rkvm.nvram"), nv, 0o644)
	os.WriteFile(filepath.Join(vm, "rkvm.vswp"), bytes.Repeat([]byte("swap page "), 300000), 0o600)
	want := hashFiles(t, vm)
	mustRun(t, "--socket", sock, "vm", "encrypt", vm)
	var st0, st1 struct {
		KEKs []string `json:"keks"`
	}
	json.Unmarshal([]byte(mustRun(t, "--socket", sock, "vm", "status", vm, "--json")), &st0)
	mustRun(t, "--socket", sock, "vm", "rekey", vm)
	json.Unmarshal([]byte(mustRun(t, "--socket", sock, "vm", "status", vm, "--json")), &st1)
	if len(st0.KEKs) != 1 || len(st1.KEKs) != 1 || st0.KEKs[0] == st1.KEKs[0] {
		t.Fatalf("shallow rekey did not change the KEK: before %v, after %v", st0.KEKs, st1.KEKs)
	}
	mustRun(t, "lab", "down", "--dir", dir)
	mustRun(t, "lab", "up", "--dir", dir)
	var st2 struct {
		Locked bool `json:"locked"`
	}
	st2.Locked = true
	for deadline := time.Now().Add(15 * time.Second); st2.Locked && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		json.Unmarshal([]byte(mustRun(t, "--socket", sock, "vm", "status", vm, "--json")), &st2)
	}
	if st2.Locked {
		t.Fatal("VM still locked 15 s after restart")
	}
	mustRun(t, "--socket", sock, "vm", "decrypt", vm)
	got := hashFiles(t, vm)
	for name, h := range want {
		if got[name] != h {
			t.Errorf("%s differs after rekey, restart and decrypt", name)
		}
	}
}

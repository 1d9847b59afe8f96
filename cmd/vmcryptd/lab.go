package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/config"
	"github.com/vmcryptd/vmcryptd/kms"
	"github.com/vmcryptd/vmcryptd/kms/labkms"
)

// A lab directory holds everything: the lab KMS (kms/), the daemon's
// config, state, audit log and socket, a demo datastore, logs, pid files
// and lab.env.
type labCmd struct {
	Up   labUpCmd   `cmd:"" help:"Start (detached) a lab KMS and a daemon using it, with host encryption mode on; writes DIR/lab.env."`
	Down labDownCmd `cmd:"" help:"Stop the lab's daemon and KMS."`
}

type labPaths struct{ dir string }

func (l labPaths) j(name string) string { return filepath.Join(l.dir, name) }
func (l labPaths) kmsDir() string       { return l.j("kms") }
func (l labPaths) socket() string       { return l.j("vmcryptd.sock") }
func (l labPaths) config() string       { return l.j("vmcryptd.toml") }
func (l labPaths) datastore() string    { return l.j("datastore") }

const labProvider = "lab"

type labUpCmd struct {
	Dir      string        `help:"Lab directory." required:"" type:"path"`
	KeyRetry time.Duration `help:"How often the daemon retries keys it could not fetch." default:"10s"`
	Hosts    int           `help:"Start a manager and this many host daemons (host1..hostN, keys only through the manager) instead of one daemon with its own KMS credentials."`
}

func (c *labUpCmd) Run(g *globals) error {
	if c.Hosts < 0 || c.Hosts > 16 {
		return fmt.Errorf("lab up: --hosts %d: use 1 to 16", c.Hosts)
	}
	lp := labPaths{c.Dir}
	if c.Hosts > 0 {
		return c.runHosts(g, lp)
	}
	for _, d := range []string{lp.dir, lp.datastore()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("lab up: %w", err)
		}
	}
	self, kmsAddr, err := ensureLabKMS(lp)
	if err != nil {
		return err
	}

	paths := labkms.PathsFor(lp.kmsDir())
	cfg := &config.Config{
		Socket:           lp.socket(),
		StateDir:         lp.j("state"),
		AuditLog:         lp.j("audit.log"),
		DefaultProvider:  labProvider,
		KMS:              []kms.Config{paths.ProviderConfig(labProvider, kmsAddr)},
		Datastores:       []config.Datastore{{Name: "lab", Path: lp.datastore()}},
		KeyRetryInterval: c.KeyRetry,
	}
	if err := config.Write(lp.config(), cfg); err != nil {
		return err
	}
	if !alive(lp.j("daemon.pid")) {
		if err := spawn(self, lp.j("daemon.log"), lp.j("daemon.pid"), "--socket", lp.socket(), "serve", "--config", lp.config()); err != nil {
			return err
		}
	}
	lg := &globals{log: g.log, socket: lp.socket()}
	if err := waitDaemon(lg, 15*time.Second); err != nil {
		return fmt.Errorf("lab up: daemon did not start (see %s): %w", lp.j("daemon.log"), err)
	}
	var he api.HostEncryption
	if err := lg.call("POST", "/host/encryption", api.HostEncryptionRequest{Enable: true}, &he); err != nil {
		return fmt.Errorf("lab up: enable host encryption mode: %w", err)
	}
	// A restarted daemon fetches its keys in the background; give it a
	// moment so the lab is usable as soon as this command returns.
	for deadline := time.Now().Add(10 * time.Second); !he.KeyLoaded && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		if err := lg.call("GET", "/host/encryption", nil, &he); err != nil {
			break
		}
	}
	env := fmt.Sprintf(`# vmcryptd lab in %s (source this file)
export VMCRYPTD_SOCKET=%q
export VMCRYPTD_KMS_ADDR=%q
export VMCRYPTD_KMS_CA=%q
export VMCRYPTD_KMS_CLIENT_CERT=%q
export VMCRYPTD_KMS_CLIENT_KEY=%q
`, lp.dir, lp.socket(), kmsAddr, paths.CACert, paths.ClientCert, paths.ClientKey)
	if err := atomicfile.Write(lp.j("lab.env"), []byte(env), 0o600); err != nil {
		return err
	}
	fmt.Print(env)
	fmt.Printf("# host key: %s/%s\n", he.Provider, he.KeyID)
	return nil
}

// ensureLabKMS initialises and starts (when down) the lab KMS, reusing its
// previous port when free; it returns this executable and the KMS address.
func ensureLabKMS(lp labPaths) (string, string, error) {
	if err := labkms.Init(lp.kmsDir()); err != nil {
		return "", "", err
	}
	self, err := os.Executable()
	if err != nil {
		return "", "", fmt.Errorf("lab up: %w", err)
	}

	// KMS: reuse the previous port when it is free, so lab.env stays valid.
	addr := "127.0.0.1:0"
	if prev, err := os.ReadFile(lp.j("kms.addr")); err == nil {
		addr = strings.TrimSpace(string(prev))
	}
	if !alive(lp.j("kms.pid")) {
		os.Remove(lp.j("kms.addr"))
		start := func(listen string) error {
			return spawn(self, lp.j("kms.log"), lp.j("kms.pid"), "--log-level", "info",
				"kms", "serve", "--dir", lp.kmsDir(), "--listen", listen, "--addr-file", lp.j("kms.addr"))
		}
		if err := start(addr); err != nil {
			return "", "", err
		}
		if _, err := waitFile(lp.j("kms.addr"), 3*time.Second); err != nil && addr != "127.0.0.1:0" {
			stopPID(lp.j("kms.pid")) // previous port taken: pick a free one
			if err := start("127.0.0.1:0"); err != nil {
				return "", "", err
			}
		}
	}
	raw, err := waitFile(lp.j("kms.addr"), 10*time.Second)
	if err != nil {
		return "", "", fmt.Errorf("lab up: lab KMS did not start (see %s): %w", lp.j("kms.log"), err)
	}
	kmsAddr := strings.TrimSpace(raw)
	return self, kmsAddr, nil
}

type labDownCmd struct {
	Dir string `help:"Lab directory." required:"" type:"path"`
}

func (c *labDownCmd) Run(g *globals) error {
	lp := labPaths{c.Dir}
	var errs []error
	// Daemons first: they zero their keys and unmount on SIGTERM; then
	// the manager, then the KMS.
	pids, _ := filepath.Glob(lp.j("host*/daemon.pid"))
	pids = append(pids, lp.j("daemon.pid"), lp.j("manager/manager.pid"), lp.j("kms.pid"))
	for _, pid := range pids {
		if err := stopPID(pid); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("lab down: %w", err)
	}
	fmt.Printf("lab in %s stopped\n", lp.dir)
	return nil
}

// spawn starts self with args in its own session, output to logPath, and
// records its pid.
func spawn(self, logPath, pidPath string, args ...string) error {
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("lab: start %s: %w", strings.Join(args, " "), err)
	}
	pid := cmd.Process.Pid
	cmd.Process.Release()
	return atomicfile.Write(pidPath, []byte(strconv.Itoa(pid)+"\n"), 0o600)
}

func readPID(pidPath string) int {
	raw, err := os.ReadFile(pidPath)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(raw)))
	return pid
}

// alive reports whether the pid file names a vmcryptd that has not fully
// exited. A process being torn down has an empty command line (its memory
// goes first) but may still hold its socket, so it counts as alive until
// it is a zombie; a command line naming another program means the pid was
// recycled. A zombie counts as exited once its last thread is gone.
func alive(pidPath string) bool {
	pid := readPID(pidPath)
	if pid <= 0 {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	if i := strings.LastIndexByte(string(stat), ')'); i >= 0 && i+2 < len(stat) {
		if st := stat[i+2]; st == 'Z' || st == 'X' {
			// A killed group leader is a zombie while its other threads
			// are still in exit, and the last of them closes the
			// process's files: /dev/fuse among them. Until then a FUSE
			// request may still be taken by a dying reader (the kernel
			// answers it EIO), and the view is not yet disconnected.
			tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
			return len(tasks) > 1
		}
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	return len(cmdline) == 0 || strings.Contains(string(cmdline), "vmcryptd")
}

// stopPID sends SIGTERM, waits up to 15 s, then SIGKILL.
func stopPID(pidPath string) error {
	if !alive(pidPath) {
		os.Remove(pidPath)
		return nil
	}
	pid := readPID(pidPath)
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return fmt.Errorf("stop pid %d: %w", pid, err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if !alive(pidPath) {
			os.Remove(pidPath)
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	os.Remove(pidPath)
	return fmt.Errorf("pid %d did not stop on SIGTERM within 15s; killed", pid)
}

func waitFile(path string, d time.Duration) (string, error) {
	deadline := time.Now().Add(d)
	for {
		raw, err := os.ReadFile(path)
		if err == nil && len(raw) > 0 {
			return string(raw), nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s did not appear within %s", path, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitDaemon waits until the daemon answers on its socket (within d)
// and has finished restoring its mounts and exports (status "ready",
// within restoreWait more: each restore is bounded by the daemon).
func waitDaemon(g *globals, d time.Duration) error {
	const restoreWait = 90 * time.Second
	deadline := time.Now().Add(d)
	answered := false
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		var st api.Status
		err := api.NewClient(g.socket).Do(ctx, "GET", "/status", nil, &st)
		cancel()
		if err == nil && st.Ready {
			return nil
		}
		if err == nil && !answered {
			answered = true
			deadline = time.Now().Add(restoreWait)
		}
		if time.Now().After(deadline) {
			if err == nil {
				return fmt.Errorf("daemon answers but has not finished restoring its mounts and exports within %s", restoreWait)
			}
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/config"
	"github.com/vmcryptd/vmcryptd/internal/manager"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
	"github.com/vmcryptd/vmcryptd/kms"
	"github.com/vmcryptd/vmcryptd/kms/labkms"
)

// A multi-host lab: D/kms (lab KMS), D/manager (manager: CA, config,
// state, audit log, socket), D/hostK (a host daemon configured through
// the manager only: vmcryptd.toml, vmcryptd.sock, daemon.pid, state,
// datastore, manager/ with its certificate bundle), and D/shared, a
// datastore every host has.
func (l labPaths) mgrDir() string               { return l.j("manager") }
func (l labPaths) mgr(name string) string       { return filepath.Join(l.mgrDir(), name) }
func (l labPaths) host(k int) string            { return l.j(fmt.Sprintf("host%d", k)) }
func (l labPaths) hostF(k int, f string) string { return filepath.Join(l.host(k), f) }

func (c *labUpCmd) runHosts(g *globals, lp labPaths) error {
	for _, d := range []string{lp.dir, lp.j("shared"), lp.mgrDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("lab up: %w", err)
		}
	}
	self, kmsAddr, err := ensureLabKMS(lp)
	if err != nil {
		return err
	}
	if err := manager.Init(lp.mgrDir(), nil); err != nil {
		return err
	}
	// Manager: reuse its previous port, so the hosts' configs stay valid.
	listen := "127.0.0.1:0"
	if prev, err := os.ReadFile(lp.mgr("manager.addr")); err == nil {
		listen = strings.TrimSpace(string(prev))
	}
	mcfg := &manager.Config{
		Listen: listen, Socket: lp.mgr("manager.sock"), StateDir: lp.mgr("state"), AuditLog: lp.mgr("audit.log"),
		PKIDir: lp.mgrDir(), DefaultProvider: labProvider,
		KMS: []kms.Config{labkms.PathsFor(lp.kmsDir()).ProviderConfig(labProvider, kmsAddr)},
	}
	if !alive(lp.mgr("manager.pid")) {
		start := func() error {
			os.Remove(lp.mgr("manager.addr"))
			if err := manager.WriteConfig(lp.mgr("manager.toml"), mcfg); err != nil {
				return err
			}
			return spawn(self, lp.mgr("manager.log"), lp.mgr("manager.pid"), "manager", "serve",
				"--config", lp.mgr("manager.toml"), "--addr-file", lp.mgr("manager.addr"))
		}
		if err := start(); err != nil {
			return err
		}
		if _, err := waitFile(lp.mgr("manager.addr"), 5*time.Second); err != nil && listen != "127.0.0.1:0" {
			stopPID(lp.mgr("manager.pid")) // previous port taken: pick a free one
			mcfg.Listen = "127.0.0.1:0"
			if err := start(); err != nil {
				return err
			}
		}
	}
	raw, err := waitFile(lp.mgr("manager.addr"), 10*time.Second)
	if err != nil {
		return fmt.Errorf("lab up: manager did not start (see %s): %w", lp.mgr("manager.log"), err)
	}
	mgrAddr := strings.TrimSpace(raw)
	ms := managerSocket{ManagerSocket: lp.mgr("manager.sock")}
	if err := waitUntil(10*time.Second, func() error { return ms.call("GET", "/status", nil, &manager.Status{}) }); err != nil {
		return fmt.Errorf("lab up: manager did not answer (see %s): %w", lp.mgr("manager.log"), err)
	}

	for k := 1; k <= c.Hosts; k++ {
		name := fmt.Sprintf("host%d", k)
		bundle := lp.hostF(k, "manager")
		if _, err := os.Stat(filepath.Join(bundle, "host.pem")); err != nil {
			var b manager.HostBundle
			err := ms.call("POST", "/hosts", manager.HostAddRequest{Name: name}, &b)
			if err != nil && strings.Contains(err.Error(), "already exists") {
				// Its bundle was lost: issue a new certificate.
				if err := ms.call("DELETE", "/hosts/"+name, nil, &manager.HostRemoved{}); err != nil {
					return fmt.Errorf("lab up: %s: %w", name, err)
				}
				err = ms.call("POST", "/hosts", manager.HostAddRequest{Name: name}, &b)
			}
			if err != nil {
				return fmt.Errorf("lab up: add %s to the manager: %w", name, err)
			}
			if _, err := writeBundle(bundle, b); err != nil {
				return fmt.Errorf("lab up: %s: %w", name, err)
			}
		}
		for _, d := range []string{lp.hostF(k, "datastore")} {
			if err := os.MkdirAll(d, 0o700); err != nil {
				return fmt.Errorf("lab up: %w", err)
			}
		}
		cfg := &config.Config{
			Socket: lp.hostF(k, "vmcryptd.sock"), StateDir: lp.hostF(k, "state"), AuditLog: lp.hostF(k, "audit.log"),
			Manager: &mgrproto.Config{Address: mgrAddr, CAFile: filepath.Join(bundle, "ca.pem"),
				CertFile: filepath.Join(bundle, "host.pem"), KeyFile: filepath.Join(bundle, "host-key.pem")},
			Datastores: []config.Datastore{
				{Name: "local", Path: lp.hostF(k, "datastore")},
				{Name: "shared", Path: lp.j("shared")},
			},
			KeyRetryInterval: c.KeyRetry,
		}
		if err := config.Write(lp.hostF(k, "vmcryptd.toml"), cfg); err != nil {
			return err
		}
		if !alive(lp.hostF(k, "daemon.pid")) {
			if err := spawn(self, lp.hostF(k, "daemon.log"), lp.hostF(k, "daemon.pid"), "--socket", cfg.Socket, "serve", "--config", lp.hostF(k, "vmcryptd.toml")); err != nil {
				return err
			}
		}
		hg := &globals{log: g.log, socket: cfg.Socket}
		if err := waitDaemon(hg, 15*time.Second); err != nil {
			return fmt.Errorf("lab up: %s did not start (see %s): %w", name, lp.hostF(k, "daemon.log"), err)
		}
		var he api.HostEncryption
		if err := hg.call("POST", "/host/encryption", api.HostEncryptionRequest{Enable: true}, &he); err != nil {
			return fmt.Errorf("lab up: %s: enable host encryption mode: %w", name, err)
		}
		for deadline := time.Now().Add(10 * time.Second); !he.KeyLoaded && time.Now().Before(deadline); {
			time.Sleep(50 * time.Millisecond)
			if err := hg.call("GET", "/host/encryption", nil, &he); err != nil {
				break
			}
		}
	}
	paths := labkms.PathsFor(lp.kmsDir())
	env := fmt.Sprintf(`# vmcryptd lab in %s with a manager and %d hosts (source this file)
export VMCRYPTD_SOCKET=%q
export VMCRYPTD_MANAGER_SOCKET=%q
export VMCRYPTD_MANAGER_ADDR=%q
export VMCRYPTD_KMS_ADDR=%q
export VMCRYPTD_KMS_CA=%q
export VMCRYPTD_KMS_CLIENT_CERT=%q
export VMCRYPTD_KMS_CLIENT_KEY=%q
`, lp.dir, c.Hosts, lp.hostF(1, "vmcryptd.sock"), lp.mgr("manager.sock"), mgrAddr, kmsAddr, paths.CACert, paths.ClientCert, paths.ClientKey)
	if err := atomicfile.Write(lp.j("lab.env"), []byte(env), 0o600); err != nil {
		return err
	}
	fmt.Print(env)
	return nil
}

func waitUntil(d time.Duration, fn func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := fn()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

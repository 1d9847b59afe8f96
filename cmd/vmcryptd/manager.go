package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/daemon"
	"github.com/vmcryptd/vmcryptd/internal/manager"
)

type managerCmd struct {
	Init   managerInitCmd   `cmd:"" help:"Create a manager directory: its CA, its server certificate for the host channel, a state dir and an example manager.toml."`
	Serve  managerServeCmd  `cmd:"" help:"Run the manager (vCenter's role): the only holder of KMS credentials, brokering KEKs to registered hosts over mutual TLS 1.3."`
	Host   managerHostCmd   `cmd:"" help:"Hosts of the manager: add (issue a certificate bundle), list, remove (revoke)."`
	Policy managerPolicyCmd `cmd:"" help:"Storage policies of the manager (as vCenter's VM storage policies): list, create, remove. Hosts with [manager] use them for 'vmcryptd policy set'."`
}

type managerPolicyCmd struct {
	List   managerPolicyListCmd   `cmd:"" help:"List storage policies: the two built-ins (VM Encryption Policy, Datastore Default) and those made with create, whether each encrypts, its key provider and how many registered VMs use it."`
	Create managerPolicyCreateCmd `cmd:"" help:"Make a storage policy: with --encrypt its VMs are encrypted under a KEK of --provider (default: the manager's default provider), without it they are stored plain (needs Cryptographer.ManageEncryptionPolicy, audited)."`
	Remove managerPolicyRemoveCmd `cmd:"" help:"Remove a storage policy; refused for the built-ins and while a VM in the inventory uses it (needs Cryptographer.ManageEncryptionPolicy, audited)."`
}

type managerPolicyListCmd struct {
	JSON bool `help:"Print JSON." name:"json"`
	managerSocket
}

func (c *managerPolicyListCmd) Run(g *globals) error {
	var ps []manager.PolicyInfo
	if err := c.call("GET", "/policies", nil, &ps); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(ps)
	}
	printManagerPolicies(ps)
	return nil
}

func printManagerPolicies(ps []manager.PolicyInfo) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "POLICY\tENCRYPTS\tPROVIDER\tVMS\tBUILT IN\tDESCRIPTION")
	for _, p := range ps {
		enc, prov := "no", "-"
		if p.Encrypts {
			enc, prov = "yes", p.Provider
			if prov == "" {
				prov = "default"
				if p.ResolvedProvider != "" {
					prov += " (" + p.ResolvedProvider + ")"
				}
			}
			if p.ResolvedProvider == "" {
				prov += " (NOT CONFIGURED)"
			}
		}
		bi := ""
		if p.Builtin {
			bi = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", p.Name, enc, prov, p.VMs, bi, p.Description)
	}
	tw.Flush()
}

type managerPolicyCreateCmd struct {
	Name        string `arg:"" help:"Policy name (1-80 bytes, no '/'; unique regardless of case)."`
	Encrypt     bool   `help:"An encryption policy: VMs under it are encrypted."`
	Provider    string `help:"Key provider of an encryption policy (one of the manager's [[kms]]; default: the manager's default provider when a VM is put under it)."`
	Description string `help:"A line describing the policy."`
	JSON        bool   `help:"Print JSON." name:"json"`
	managerSocket
}

func (c *managerPolicyCreateCmd) Run(g *globals) error {
	if c.Provider != "" && !c.Encrypt {
		return fmt.Errorf("--provider is only for an encryption policy: add --encrypt")
	}
	var p manager.PolicyInfo
	if err := c.call("POST", "/policies", manager.PolicyCreateRequest{Name: c.Name, Encrypt: c.Encrypt, Provider: c.Provider, Description: c.Description}, &p); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(p)
	}
	if p.Encrypts {
		fmt.Printf("policy %q created: encrypts under provider %s\n", p.Name, orDefaultProvider(p))
	} else {
		fmt.Printf("policy %q created: stores VMs plain\n", p.Name)
	}
	return nil
}

func orDefaultProvider(p manager.PolicyInfo) string {
	if p.Provider != "" {
		return p.Provider
	}
	return "the manager's default (now " + orNone(p.ResolvedProvider) + ")"
}

type managerPolicyRemoveCmd struct {
	Name string `arg:"" help:"Policy name."`
	managerSocket
}

func (c *managerPolicyRemoveCmd) Run(g *globals) error {
	var r manager.PolicyRemoved
	if err := c.call("DELETE", "/policies/"+pathEscape(c.Name), nil, &r); err != nil {
		return err
	}
	fmt.Printf("policy %q removed\n", r.Name)
	return nil
}

type managerInitCmd struct {
	Dir   string   `help:"Manager directory." required:"" type:"path"`
	Names []string `help:"Host names or IPs the hosts reach the manager by (its server certificate names them; 127.0.0.1 and localhost always)." name:"name"`
}

func (c *managerInitCmd) Run(g *globals) error {
	if err := manager.Init(c.Dir, c.Names); err != nil {
		return err
	}
	cfgPath := filepath.Join(c.Dir, "manager.toml")
	if _, err := os.Stat(cfgPath); os.IsNotExist(err) {
		example := `# vmcryptd manager configuration (see docs/MANAGER.md)
listen = "` + manager.DefaultListen + `"
socket = "manager.sock"
state_dir = "state"
pki_dir = "."
# default_provider = "kms1"

# The manager's key providers: the KMS credentials live here, nowhere else.
# [[kms]]
# name = "kms1"
# servers = ["kms.example:5696"]
# ca_file = "kms/ca.pem"
# cert_file = "kms/client.pem"
# key_file = "kms/client-key.pem"
`
		if err := atomicfile.Write(cfgPath, []byte(example), 0o600); err != nil {
			return err
		}
	}
	fmt.Printf("manager directory %s ready: CA %s; edit %s, then 'vmcryptd manager serve --config %s'\n",
		c.Dir, filepath.Join(c.Dir, manager.CACertFile), cfgPath, cfgPath)
	return nil
}

type managerServeCmd struct {
	Config   string `help:"manager.toml." required:"" type:"existingfile"`
	AddrFile string `help:"Write the host channel's bound address here (for listen ports of 0)." name:"addr-file" type:"path"`
}

func (c *managerServeCmd) Run(g *globals) error {
	if err := daemon.HardenProcess(); err != nil {
		return err
	}
	cfg, err := manager.LoadConfig(c.Config)
	if err != nil {
		return err
	}
	m, err := manager.New(manager.Options{Config: cfg, Logger: g.log, Version: version, AddrFile: c.AddrFile})
	if err != nil {
		return err
	}
	defer m.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := m.Run(ctx); err != nil {
		return fmt.Errorf("manager serve: %w", err)
	}
	return nil
}

type managerHostCmd struct {
	Add    managerHostAddCmd    `cmd:"" help:"Register a host and write its certificate bundle (ca.pem, host.pem, host-key.pem, manager.toml snippet) into --out (needs Cryptographer.RegisterHost)."`
	List   managerHostListCmd   `cmd:"" help:"List hosts: address, last seen, host encryption mode, VMs, keys held."`
	Remove managerHostRemoveCmd `cmd:"" help:"Remove a host: its certificate is revoked and it is refused at once; its VMs are released (needs Cryptographer.RegisterHost)."`
	Lock   managerHostLockCmd   `cmd:"" help:"Lock a host: it zeroes every KEK and DEK at once (as vmcryptd lock does there) and is handed no key until unlocked; survives restarts of either side (needs Cryptographer.ManageKeys)."`
	Unlock managerHostUnlockCmd `cmd:"" help:"Unlock a host locked by manager host lock: it fetches its keys again (needs Cryptographer.ManageKeys)."`
}

type managerHostLockCmd struct {
	Name string `arg:"" help:"Host name."`
	managerSocket
}

func (c *managerHostLockCmd) Run(g *globals) error {
	var r manager.HostLockReply
	if err := c.call("POST", "/hosts/"+queryEscape(c.Name)+"/lock", struct{}{}, &r); err != nil {
		return err
	}
	if !r.Changed {
		fmt.Printf("host %s was already locked\n", r.Name)
		return nil
	}
	fmt.Printf("host %s locked: it zeroes every key now and is handed none until 'vmcryptd manager host unlock %s'\n", r.Name, r.Name)
	return nil
}

type managerHostUnlockCmd struct {
	Name string `arg:"" help:"Host name."`
	managerSocket
}

func (c *managerHostUnlockCmd) Run(g *globals) error {
	var r manager.HostLockReply
	if err := c.call("POST", "/hosts/"+queryEscape(c.Name)+"/unlock", struct{}{}, &r); err != nil {
		return err
	}
	if !r.Changed {
		fmt.Printf("host %s was not locked\n", r.Name)
		return nil
	}
	fmt.Printf("host %s unlocked: it fetches its keys again\n", r.Name)
	return nil
}

// managerSocket is the admin socket flag of the manager commands.
type managerSocket struct {
	ManagerSocket string `help:"Manager admin socket." env:"VMCRYPTD_MANAGER_SOCKET" default:"/run/vmcryptd/manager.sock" type:"path" name:"manager-socket"`
}

func (m managerSocket) call(method, path string, req, resp any) error {
	return (&globals{socket: m.ManagerSocket}).call(method, path, req, resp)
}

type managerHostAddCmd struct {
	Name    string `arg:"" help:"Host name (the certificate's CN)."`
	Address string `help:"The host's address (HOST:PORT), recorded in the inventory."`
	Out     string `help:"Directory for the bundle (default: ./NAME)." type:"path"`
	CSR     string `help:"Sign this certificate request (from 'vmcryptd host join') instead of making a key: the bundle then holds no private key, and its manager.toml names host-key.pem in --out, where host join left it." type:"existingfile" name:"csr"`
	managerSocket
}

// writeBundle stores a host bundle as the files a [manager] section names.
func writeBundle(dir string, b manager.HostBundle) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	files := []struct {
		name, body string
		mode       os.FileMode
	}{{"host-key.pem", b.KeyPEM, 0o600}, {"host.pem", b.CertPEM, 0o644}, {"ca.pem", b.CAPEM, 0o644}}
	for _, f := range files {
		if f.body == "" {
			continue // signed from a CSR: the key stays where the host made it
		}
		if err := atomicfile.Write(filepath.Join(dir, f.name), []byte(f.body), f.mode); err != nil {
			return "", err
		}
	}
	snippet := fmt.Sprintf("[manager]\naddress = %q\nca_file = %q\ncert_file = %q\nkey_file = %q\n", b.ManagerAddress,
		filepath.Join(dir, "ca.pem"), filepath.Join(dir, "host.pem"), filepath.Join(dir, "host-key.pem"))
	return snippet, atomicfile.Write(filepath.Join(dir, "manager.toml"), []byte(snippet), 0o644)
}

func (c *managerHostAddCmd) Run(g *globals) error {
	req := manager.HostAddRequest{Name: c.Name, Address: c.Address}
	if c.CSR != "" {
		csr, err := os.ReadFile(c.CSR)
		if err != nil {
			return fmt.Errorf("--csr: %w", err)
		}
		req.CSR = string(csr)
	}
	var b manager.HostBundle
	if err := c.call("POST", "/hosts", req, &b); err != nil {
		return err
	}
	out := c.Out
	if out == "" {
		out = c.Name
	}
	snippet, err := writeBundle(out, b)
	if err != nil {
		return fmt.Errorf("host %s was added but its bundle could not be written (remove and add it again): %w", c.Name, err)
	}
	fmt.Printf("host %s added (certificate %s); bundle in %s; put this in the host's vmcryptd.toml instead of [[kms]]:\n%s", c.Name, b.Serial, out, snippet)
	return nil
}

type managerHostListCmd struct {
	JSON bool `help:"Print JSON." name:"json"`
	managerSocket
}

func (c *managerHostListCmd) Run(g *globals) error {
	var hosts []manager.HostInfo
	if err := c.call("GET", "/hosts", nil, &hosts); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(hosts)
	}
	printHosts(hosts)
	return nil
}

func printHosts(hosts []manager.HostInfo) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tADDRESS\tLAST SEEN\tHOST ENCRYPTION\tVMS\tKEYS HELD\tLOCKED")
	for _, h := range hosts {
		seen := "never"
		if !h.LastSeen.IsZero() {
			seen = h.LastSeen.Format(time.DateTime)
		}
		locked := "no"
		if h.Locked {
			locked = "yes (by " + h.LockedBy + " at " + h.LockedAt.Local().Format(time.DateTime) + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s\n", h.Name, orNone(h.Address), seen, orNone(h.HostEncryption), h.VMs, len(h.KeysHeld), locked)
	}
	tw.Flush()
}

type managerHostRemoveCmd struct {
	Name string `arg:"" help:"Host name."`
	managerSocket
}

func (c *managerHostRemoveCmd) Run(g *globals) error {
	var r manager.HostRemoved
	if err := c.call("DELETE", "/hosts/"+queryEscape(c.Name), nil, &r); err != nil {
		return err
	}
	fmt.Printf("host %s removed: certificate %s revoked; %d VM(s) released: %s\n", r.Name, r.Serial, len(r.ReleasedVMs), strings.Join(r.ReleasedVMs, ", "))
	return nil
}

func printManagerStatus(raw json.RawMessage, asJSON bool) error {
	var st manager.Status
	if err := json.Unmarshal(raw, &st); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	if asJSON {
		return printJSON(st)
	}
	fmt.Printf("vmcryptd manager %s, pid %d, up since %s, host channel %s\n", st.Version, st.PID, st.Started.Format(time.DateTime), st.Listen)
	fmt.Printf("you: %s (uid %d), role %s\n", st.Caller.User, st.Caller.UID, orNone(st.Caller.Role))
	locked := "mlocked"
	if !st.KeysLocked {
		locked = "NOT mlocked (raise RLIMIT_MEMLOCK)"
	}
	fmt.Printf("keys in memory: %d (%s); KMS fetches since start: %d\n", st.CachedKeys, locked, st.KMSFetches)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\nPROVIDER\tDEFAULT\tSERVERS")
	for _, p := range st.Providers {
		def := ""
		if p.Default {
			def = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", p.Name, def, strings.Join(p.Servers, ", "))
	}
	tw.Flush()
	fmt.Println()
	printHosts(st.Hosts)
	tw = tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\nVM\tHOST\tDIR\tPOLICY\tSTATE\tKEYS\tREASON")
	for _, vm := range st.VMs {
		state := "unlocked"
		if vm.Locked {
			state = "locked"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", vm.ID, vm.Host, vm.Dir, vm.Policy, state, strings.Join(vm.Keys, ","), vm.Reason)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Println()
	printManagerPolicies(st.Policies)
	return nil
}

// vm register / unregister (host daemon).

type vmRegisterCmd struct {
	Dir  string `arg:"" help:"VM directory (inside a datastore)." type:"path"`
	JSON bool   `help:"Print JSON." name:"json"`
}

func (c *vmRegisterCmd) Run(g *globals) error {
	var r api.VMRegisterReply
	if err := g.call("POST", "/vm/register", api.VMRegisterRequest{Dir: c.Dir}, &r); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(r)
	}
	where := "registered"
	if r.Manager != "" {
		where += " here and with the manager"
	}
	fmt.Printf("%s (VM %s) %s; keys %s\n", r.Dir, r.VMID, where, strings.Join(r.Keys, ", "))
	return nil
}

type vmUnregisterCmd struct {
	Dir  string `arg:"" help:"VM directory." type:"path"`
	JSON bool   `help:"Print JSON." name:"json"`
}

func (c *vmUnregisterCmd) Run(g *globals) error {
	var r api.VMRegisterReply
	if err := g.call("POST", "/vm/unregister", api.VMRegisterRequest{Dir: c.Dir}, &r); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(r)
	}
	fmt.Printf("%s (VM %s) unregistered; its keys are no longer held here\n", r.Dir, r.VMID)
	return nil
}

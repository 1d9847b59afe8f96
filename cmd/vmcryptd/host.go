package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/pki"
)

type hostCmd struct {
	Encryption hostEncryptionCmd `cmd:"" help:"Host encryption mode: required before any VM can be encrypted."`
	Join       hostJoinCmd       `cmd:"" help:"Make this host's key pair and a certificate request for the manager locally (the key never leaves the host): writes DIR/host-key.pem (0600) and DIR/host.csr; sign it on the manager with 'vmcryptd manager host add NAME --csr host.csr --out DIR'."`
}

type hostJoinCmd struct {
	Name string `arg:"" help:"The host's name at the manager (the certificate's CN)."`
	Out  string `help:"Directory for host-key.pem and host.csr (default: ./NAME)." type:"path"`
}

func (c *hostJoinCmd) Run(g *globals) error {
	out := c.Out
	if out == "" {
		out = c.Name
	}
	keyPath, csrPath := filepath.Join(out, "host-key.pem"), filepath.Join(out, "host.csr")
	if _, err := os.Stat(keyPath); err == nil {
		return fmt.Errorf("%s exists: refusing to replace a host key (remove it first)", keyPath)
	}
	csr, key, err := pki.NewClientCSR(c.Name)
	if err != nil {
		return err
	}
	defer clear(key)
	if err := os.MkdirAll(out, 0o700); err != nil {
		return err
	}
	if err := atomicfile.Write(keyPath, key, 0o600); err != nil {
		return err
	}
	if err := atomicfile.Write(csrPath, csr, 0o644); err != nil {
		return err
	}
	fmt.Printf("key pair made in %s; send %s to the manager and run there: vmcryptd manager host add %s --csr host.csr --out %s\n", keyPath, csrPath, c.Name, out)
	return nil
}

type hostEncryptionCmd struct {
	Enable  hostEncEnable  `cmd:"" help:"Enable: create a host key on the key provider and remember its id."`
	Disable hostEncDisable `cmd:"" help:"Disable: forget the host key (refused while encrypted VMs are registered)."`
	Status  hostEncStatus  `cmd:"" help:"Show the mode and the host key id."`
}

type hostEncEnable struct {
	Provider string `help:"Key provider (default: the default provider)."`
}

func (c *hostEncEnable) Run(g *globals) error {
	var he api.HostEncryption
	if err := g.call("POST", "/host/encryption", api.HostEncryptionRequest{Enable: true, Provider: c.Provider}, &he); err != nil {
		return err
	}
	fmt.Printf("host encryption mode enabled; host key %s/%s\n", he.Provider, he.KeyID)
	return nil
}

type hostEncDisable struct{}

func (c *hostEncDisable) Run(g *globals) error {
	var he api.HostEncryption
	if err := g.call("POST", "/host/encryption", api.HostEncryptionRequest{Enable: false}, &he); err != nil {
		return err
	}
	fmt.Println("host encryption mode disabled")
	return nil
}

type hostEncStatus struct {
	JSON bool `help:"Print JSON." name:"json"`
}

func (c *hostEncStatus) Run(g *globals) error {
	var he api.HostEncryption
	if err := g.call("GET", "/host/encryption", nil, &he); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(he)
	}
	if !he.Enabled {
		fmt.Println("host encryption mode: disabled")
		return nil
	}
	fmt.Printf("host encryption mode: enabled, host key %s/%s, loaded: %v\n", he.Provider, he.KeyID, he.KeyLoaded)
	return nil
}

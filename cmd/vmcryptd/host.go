package main

import (
	"fmt"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

type hostCmd struct {
	Encryption hostEncryptionCmd `cmd:"" help:"Host encryption mode: required before any VM can be encrypted."`
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

package main

import (
	"context"
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
	"github.com/vmcryptd/vmcryptd/kms/labkms"
)

type kmsCmd struct {
	Add    kmsAddCmd    `cmd:"" help:"Add a key provider (one or more KMIP servers, tried in order)."`
	List   kmsListCmd   `cmd:"" help:"List key providers."`
	Status kmsStatusCmd `cmd:"" help:"Check each server of a provider: reachability, TLS both ways, KMIP version, latency."`
	Remove kmsRemoveCmd `cmd:"" help:"Remove a key provider added with 'kms add'."`
	Init   kmsInitCmd   `cmd:"" help:"Create the embedded lab KMS's CA, certificates and master key in DIR."`
	Serve  kmsServeCmd  `cmd:"" help:"Run the embedded lab KMS (KMIP over mutual TLS)."`
}

type kmsAddCmd struct {
	Name    string   `arg:"" help:"Provider name (stored next to every key id: keep it stable)."`
	Server  []string `help:"KMIP server HOST:PORT (repeat for failover order)." required:""`
	CA      string   `help:"PEM CA bundle that signs the servers' certificates." required:"" type:"existingfile"`
	Cert    string   `help:"PEM client certificate." required:"" type:"existingfile"`
	Key     string   `help:"PEM client private key." required:"" type:"existingfile"`
	Default bool     `help:"Make it the default provider."`
	// Singular flag name, repeated like --server.
	TLSCipherSuite []string `name:"tls-cipher-suite" help:"Also offer this TLS 1.2 cipher suite, by Go name (repeatable), e.g. TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256 for servers with RSA certificates that only speak CBC-SHA256; insecure suites only when listed."`
}

func (c *kmsAddCmd) Run(g *globals) error {
	var info api.ProviderInfo
	req := api.ProviderAdd{Name: c.Name, Servers: c.Server, CAFile: c.CA, CertFile: c.Cert, KeyFile: c.Key, Default: c.Default,
		TLSCipherSuites: c.TLSCipherSuite}
	if err := g.call("POST", "/kms", req, &info); err != nil {
		return err
	}
	fmt.Printf("key provider %q added (%s)\n", info.Name, strings.Join(info.Servers, ", "))
	return nil
}

type kmsListCmd struct {
	JSON bool `help:"Print JSON." name:"json"`
}

func (c *kmsListCmd) Run(g *globals) error {
	var ps []api.ProviderInfo
	if err := g.call("GET", "/kms", nil, &ps); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(ps)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tDEFAULT\tSOURCE\tSERVERS")
	for _, p := range ps {
		def := ""
		if p.Default {
			def = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Name, def, p.Source, strings.Join(p.Servers, ", "))
	}
	return tw.Flush()
}

type kmsStatusCmd struct {
	Name string `arg:"" optional:"" help:"Provider (default: all)."`
	JSON bool   `help:"Print JSON." name:"json"`
}

func (c *kmsStatusCmd) Run(g *globals) error {
	names := []string{c.Name}
	if c.Name == "" {
		var ps []api.ProviderInfo
		if err := g.call("GET", "/kms", nil, &ps); err != nil {
			return err
		}
		names = names[:0]
		for _, p := range ps {
			names = append(names, p.Name)
		}
	}
	var all []api.ProviderStatus
	for _, n := range names {
		var ps api.ProviderStatus
		if err := g.call("GET", "/kms/"+n+"/status", nil, &ps); err != nil {
			return err
		}
		all = append(all, ps)
	}
	if c.JSON {
		return printJSON(all)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PROVIDER\tSERVER\tREACHABLE\tTLS\tKMIP\tLATENCY\tSERVER INFO / ERROR")
	for _, ps := range all {
		for _, s := range ps.Servers {
			info := s.ServerInfo
			if s.Vendor != "" {
				info = s.Vendor + " " + info
			}
			if s.Error != "" {
				info = s.Error
			}
			fmt.Fprintf(tw, "%s\t%s\t%v\t%v\t%s\t%s\t%s\n", ps.Name, s.Address, s.Reachable, s.TLSOK, s.KMIPVersion,
				s.Latency.Round(100*time.Microsecond), info)
		}
	}
	return tw.Flush()
}

type kmsRemoveCmd struct {
	Name string `arg:""`
}

func (c *kmsRemoveCmd) Run(g *globals) error {
	if err := g.call("DELETE", "/kms/"+c.Name, nil, nil); err != nil {
		return err
	}
	fmt.Printf("key provider %q removed\n", c.Name)
	return nil
}

type kmsInitCmd struct {
	Dir string `help:"Lab KMS directory." required:"" type:"path"`
}

func (c *kmsInitCmd) Run(g *globals) error {
	if err := labkms.Init(c.Dir); err != nil {
		return err
	}
	p := labkms.PathsFor(c.Dir)
	fmt.Printf("lab KMS ready in %s\nCA: %s\nclient certificate: %s\nclient key: %s\n", c.Dir, p.CACert, p.ClientCert, p.ClientKey)
	return nil
}

type kmsServeCmd struct {
	Dir      string `help:"Lab KMS directory (initialised on first start)." required:"" type:"path"`
	Listen   string `help:"Address to listen on (loopback by default; port 0 picks a free one)." default:"127.0.0.1:5696"`
	AddrFile string `help:"Write the bound address to this file once listening." type:"path"`
}

func (c *kmsServeCmd) Run(g *globals) error {
	// The lab KMS holds keys in memory too: no core dumps, no ptrace.
	if err := daemon.HardenProcess(); err != nil {
		return err
	}
	if err := labkms.Init(c.Dir); err != nil {
		return err
	}
	srv, err := labkms.Listen(c.Dir, c.Listen, g.log)
	if err != nil {
		return err
	}
	if c.AddrFile != "" {
		if err := atomicfile.Write(c.AddrFile, []byte(srv.Addr()+"\n"), 0o644); err != nil {
			srv.Close()
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve() }()
	fmt.Fprintf(os.Stderr, "lab KMS listening on %s (dir %s)\n", srv.Addr(), filepath.Clean(c.Dir))
	select {
	case <-ctx.Done():
		return srv.Close()
	case err := <-errc:
		srv.Close()
		return err
	}
}

type keyCmd struct {
	Create keyCreateCmd `cmd:"" help:"Create an AES-256 key on a key provider (needs ManageKeys)."`
}

type keyCreateCmd struct {
	Provider string `help:"Key provider (default: the default provider)."`
	Name     string `help:"Key name on the server." default:"vmcryptd-key"`
}

func (c *keyCreateCmd) Run(g *globals) error {
	var res struct {
		Provider string `json:"provider"`
		KeyID    string `json:"key_id"`
	}
	if err := g.call("POST", "/keys", map[string]string{"provider": c.Provider, "name": c.Name}, &res); err != nil {
		return err
	}
	fmt.Printf("%s/%s\n", res.Provider, res.KeyID)
	return nil
}

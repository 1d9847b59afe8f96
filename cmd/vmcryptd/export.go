package main

import (
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

type exportCmd struct {
	Start exportStartCmd `cmd:"" help:"Serve a virtual disk decrypted over NBD (needs Cryptographer.Access)."`
	List  exportListCmd  `cmd:"" help:"List NBD exports."`
	Stop  exportStopCmd  `cmd:"" help:"Stop an NBD export (its clients are disconnected; in-flight requests finish first)."`
}

type exportStartCmd struct {
	Disk     string `arg:"" help:"The disk's descriptor (DIR/DISK.vmdk) inside a datastore." type:"path"`
	Unix     string `help:"Listen on this unix socket (mode 0600, owned by the caller)." type:"path" xor:"listen" required:""`
	TCP      string `name:"tcp" help:"Listen on HOST:PORT; needs --tls-cert, --tls-key and --tls-ca (mutual TLS, plain TCP is refused)." xor:"listen" required:""`
	Name     string `help:"Export name (default empty: the default export, nbd+unix:///?socket=PATH)."`
	ReadOnly bool   `help:"Refuse writes. Sparse, streamOptimized and delta disks can only be exported read-only (grains are not allocated)."`
	TLSCert  string `name:"tls-cert" help:"Server certificate (PEM) for --tcp." type:"path"`
	TLSKey   string `name:"tls-key" help:"Server private key (PEM) for --tcp." type:"path"`
	TLSCA    string `name:"tls-ca" help:"CA (PEM) that client certificates must chain to, for --tcp." type:"path"`
	JSON     bool   `help:"Print JSON." name:"json"`
}

func (c *exportStartCmd) Run(g *globals) error {
	abs := func(p string) string {
		if p == "" {
			return ""
		}
		a, err := filepath.Abs(p)
		if err != nil {
			return p
		}
		return a
	}
	req := api.ExportRequest{Disk: abs(c.Disk), Unix: abs(c.Unix), TCP: c.TCP, Name: c.Name, ReadOnly: c.ReadOnly,
		TLSCert: abs(c.TLSCert), TLSKey: abs(c.TLSKey), TLSCA: abs(c.TLSCA)}
	var res api.ExportInfo
	if err := g.call("POST", "/exports", req, &res); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(res)
	}
	mode := "read-write"
	if res.ReadOnly {
		mode = "read-only"
	}
	fmt.Printf("%s exported %s (%d bytes) at %s\n", res.Disk, mode, res.Size, res.URI)
	return nil
}

type exportListCmd struct {
	JSON bool `help:"Print JSON." name:"json"`
}

func (c *exportListCmd) Run(g *globals) error {
	var res []api.ExportInfo
	if err := g.call("GET", "/exports", nil, &res); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(res)
	}
	printExports(res)
	return nil
}

func printExports(res []api.ExportInfo) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "URI\tDISK\tMODE\tSIZE\tCLIENTS\tSTATE")
	for _, e := range res {
		mode := "rw"
		if e.ReadOnly {
			mode = "ro"
		}
		state := "serving"
		if e.Error != "" {
			state = e.Error
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\n", e.URI, e.Disk, mode, e.Size, e.Connections, state)
	}
	tw.Flush()
}

type exportStopCmd struct {
	Target string `arg:"" help:"The export's socket path, TCP address, name or disk."`
}

func (c *exportStopCmd) Run(g *globals) error {
	t := c.Target
	if filepath.IsAbs(t) || (len(t) > 0 && t[0] == '.') {
		if a, err := filepath.Abs(t); err == nil {
			t = a
		}
	}
	var res api.ExportInfo
	if err := g.call("POST", "/exports/stop", api.ExportStopRequest{Target: t}, &res); err != nil {
		return err
	}
	fmt.Printf("export %s of %s stopped\n", res.URI, res.Disk)
	return nil
}

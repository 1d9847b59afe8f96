package main

import (
	"os"

	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/internal/inspect"
)

// inspect runs locally, with no daemon and no key: it only reads.
type inspectCmd struct {
	Path string `arg:"" help:"A file or a VM directory (not followed if a symlink; FIFOs, sockets and devices are named, not read)." type:"path"`
	JSON bool   `help:"Print JSON." name:"json"`
}

func (c *inspectCmd) Run(g *globals) error {
	r, err := inspect.InspectWith(c.Path, inspect.Options{Detector: vm.DetectContainer})
	if err != nil {
		return err
	}
	if c.JSON {
		return printJSON(r)
	}
	return r.WriteText(os.Stdout)
}

package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

type lockCmd struct {
	JSON bool `help:"Print JSON." name:"json"`
}

func (c *lockCmd) Run(g *globals) error {
	var res api.LockResult
	if err := g.call("POST", "/lock", struct{}{}, &res); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(res)
	}
	if res.AlreadyLocked {
		fmt.Println("was already locked; locked again:")
	}
	fmt.Printf("locked: %d KEKs zeroed, DEK caches of %d views zeroed, %d open encrypted files sealed (they answer EACCES), page cache of %d files dropped; run 'vmcryptd unlock' to fetch the keys again\n",
		res.KEKsZeroed, res.Views, res.FilesSealed, res.PagesInvalidated)
	return nil
}

type unlockCmd struct {
	JSON bool `help:"Print JSON." name:"json"`
}

func (c *unlockCmd) Run(g *globals) error {
	var res api.UnlockResult
	if err := g.call("POST", "/unlock", struct{}{}, &res); err != nil {
		return err
	}
	if c.JSON {
		if err := printJSON(res); err != nil {
			return err
		}
	} else {
		if !res.WasLocked {
			fmt.Println("was not locked")
		}
		fmt.Printf("unlocked: %d keys fetched\n", len(res.Loaded))
	}
	for _, f := range res.Failed {
		fmt.Fprintf(os.Stderr, "vmcryptd: key %s not fetched: %s\n", f.Key, f.Error)
	}
	if len(res.Failed) > 0 {
		// Unlocked, but not every VM has its key back: not a plain success.
		return exitCode(exitError)
	}
	return nil
}

type reloadCmd struct{}

func (reloadCmd) Run(g *globals) error {
	var res api.ReloadResult
	if err := g.call("POST", "/reload", struct{}{}, &res); err != nil {
		return err
	}
	if len(res.Applied) == 0 {
		fmt.Printf("reloaded %s: nothing changed\n", res.Config)
		return nil
	}
	fmt.Printf("reloaded %s: %s applied\n", res.Config, strings.Join(res.Applied, ", "))
	for _, c := range res.Changes {
		fmt.Printf("  %s\n", c)
	}
	return nil
}

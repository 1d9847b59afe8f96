package main

import (
	"errors"
	"fmt"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

// Exit codes of vmcryptd (README "Exit codes"; kong exits 80 on a usage
// error before any command runs).
const (
	exitError          = 1 // the command failed (the message says why)
	exitProblems       = 3 // vm check found problems (after --repair: problems remain)
	exitDenied         = 4 // a privilege is missing
	exitKeyUnavailable = 5 // a KEK is not in memory (locked, KMS or manager down)
	exitInterrupted    = 6 // the VM has an unfinished conversion: re-run it or --abort
	exitRefused        = 7 // a file refused by the VM's files (FORMAT.md 5)
	exitUnreachable    = 8 // the daemon is not running or did not answer
)

// exitFor is the exit code for a command's error.
func exitFor(err error) int {
	var code exitCode
	var denied *api.DeniedError
	var st *api.StatusError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &code):
		return int(code)
	case errors.As(err, &denied):
		return exitDenied
	case errors.Is(err, api.ErrUnreachable):
		return exitUnreachable
	case errors.As(err, &st):
		switch st.Kind {
		case api.KindDenied:
			return exitDenied
		case api.KindKeyUnavailable:
			return exitKeyUnavailable
		case api.KindInterrupted:
			return exitInterrupted
		case api.KindRefused:
			return exitRefused
		}
	}
	return exitError
}

// exitCode makes main exit with a code other than exitError, after
// printing nothing more (the command has printed its result).
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

type vmCheckCmd struct {
	Dir       string `arg:"" optional:"" help:"VM directory (or use --datastore)." type:"path"`
	Datastore string `help:"Check every VM directory of this configured datastore (name or path)."`
	Repair    bool   `help:"Apply the fixes that need no guess: rewrite a damaged or stale header slot from the authenticated one, restore lost key lines from the extents' keySafe copy; then check again. Needs Cryptographer.Recrypt and Cryptographer.AddDisk."`
	JSON      bool   `help:"Print the reports as JSON." name:"json"`
}

func (c *vmCheckCmd) Run(g *globals) error {
	if (c.Dir == "") == (c.Datastore == "") {
		return fmt.Errorf("give a VM directory or --datastore NAME")
	}
	var res api.CheckReply
	if err := g.call("POST", "/vm/check", api.CheckRequest{Dir: c.Dir, Datastore: c.Datastore, Repair: c.Repair}, &res); err != nil {
		return err
	}
	problems := false
	for _, r := range res.Reports {
		problems = problems || len(r.Findings) > 0
	}
	if c.JSON {
		if err := printJSON(res); err != nil {
			return err
		}
	} else {
		for _, r := range res.Reports {
			for _, line := range r.Repaired {
				fmt.Printf("%s: repaired %s\n", r.Dir, line)
			}
			for _, f := range r.Findings {
				fmt.Printf("%s: %s\n", r.Dir, f)
			}
			fmt.Println(r.Summary())
		}
	}
	if problems {
		return exitCode(exitProblems)
	}
	return nil
}

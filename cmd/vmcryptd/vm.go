package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/internal/api"
)

type vmCmd struct {
	Create     vmCreateCmd     `cmd:"" help:"Create a new VM directory (vmx, nvram, disks), optionally encrypted from the first byte."`
	Encrypt    vmEncryptCmd    `cmd:"" help:"Encrypt a plain VM in place (new KEK on the provider, fresh VM and disk DEKs). Re-run to resume after a crash, or --abort to roll back."`
	Decrypt    vmDecryptCmd    `cmd:"" help:"Decrypt an encrypted VM back to plain, byte for byte. Re-run to resume after a crash, or --abort to roll back."`
	Rekey      vmRekeyCmd      `cmd:"" help:"Shallow rekey (new KEK, keySafes rewritten) or --deep (new DEKs, all data re-encrypted; --abort rolls an interrupted one back)."`
	Status     vmStatusCmd     `cmd:"" help:"Per-file encryption state, key ids, DEK fingerprints; per-VM policy and lock state."`
	Register   vmRegisterCmd   `cmd:"" help:"Register an encrypted VM with this host (and with the manager, which entitles the host to its keys); needs Cryptographer.RegisterVM."`
	Unregister vmUnregisterCmd `cmd:"" help:"Unregister a VM from this host (and the manager); keys no other VM needs are zeroed."`
	Check      vmCheckCmd      `cmd:"" help:"Verify every container's header slots, size, kind and key binding and every disk's key lines against the VM's text files; --repair fixes what needs no guess. Exit 3 when problems are found."`
}

// progressOpts are shared by the converting commands.
type progressOpts struct {
	JSON bool `help:"Print progress and the result as JSON lines (the default when stdout is not a terminal)." name:"json"`
}

// abortOpt is shared by the converting commands.
type abortOpt struct {
	Abort bool `help:"Roll the VM's interrupted conversion of this kind back to the state before it started (same privilege as the operation, audited)."`
}

type vmEncryptCmd struct {
	Dir      string `arg:"" help:"VM directory (inside a datastore)." type:"path"`
	Provider string `help:"Key provider (default: the default provider)."`
	KeyID    string `help:"Use this existing KEK instead of creating one." name:"key-id"`
	abortOpt
	progressOpts
}

func (c *vmEncryptCmd) Run(g *globals) error {
	if c.Abort {
		if c.Provider != "" || c.KeyID != "" {
			return fmt.Errorf("--abort takes no --provider or --key-id: it goes back to the keys the VM had")
		}
		return g.convert("/vm/encrypt", api.VMRequest{Dir: c.Dir, Abort: true}, c.JSON, "encryption aborted, back to plain")
	}
	return g.convert("/vm/encrypt", api.VMRequest{Dir: c.Dir, Provider: c.Provider, KeyID: c.KeyID}, c.JSON, "encrypted")
}

type vmDecryptCmd struct {
	Dir string `arg:"" help:"VM directory." type:"path"`
	abortOpt
	progressOpts
}

func (c *vmDecryptCmd) Run(g *globals) error {
	if c.Abort {
		return g.convert("/vm/decrypt", api.VMRequest{Dir: c.Dir, Abort: true}, c.JSON, "decryption aborted, back to encrypted")
	}
	return g.convert("/vm/decrypt", api.VMRequest{Dir: c.Dir}, c.JSON, "decrypted")
}

type vmRekeyCmd struct {
	Dir      string `arg:"" help:"VM directory." type:"path"`
	Deep     bool   `help:"New DEKs and all data re-encrypted (refused while the VM has snapshots)."`
	Provider string `help:"Key provider of the new KEK."`
	KeyID    string `help:"Use this existing KEK." name:"key-id"`
	abortOpt
	progressOpts
}

func (c *vmRekeyCmd) Run(g *globals) error {
	if c.Abort {
		if c.Provider != "" || c.KeyID != "" {
			return fmt.Errorf("--abort takes no --provider or --key-id: it goes back to the keys the VM had")
		}
		return g.convert("/vm/rekey", api.VMRequest{Dir: c.Dir, Deep: true, Abort: true}, c.JSON, "deep rekey aborted, back to the old keys")
	}
	what := "rekeyed (shallow: new KEK)"
	if c.Deep {
		what = "rekeyed (deep: new DEKs)"
	}
	return g.convert("/vm/rekey", api.VMRequest{Dir: c.Dir, Deep: c.Deep, Provider: c.Provider, KeyID: c.KeyID}, c.JSON, what)
}

type vmStatusCmd struct {
	Dir  string `arg:"" help:"VM directory." type:"path"`
	JSON bool   `help:"Print JSON." name:"json"`
}

func (c *vmStatusCmd) Run(g *globals) error {
	var st api.VMStatusReply
	if err := g.call("GET", "/vm/status?dir="+queryEscape(c.Dir), nil, &st); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(st)
	}
	state := "plain"
	if st.Encrypted {
		state = "encrypted"
	}
	lock := "unlocked"
	if st.Locked {
		lock = "LOCKED: " + st.LockReason
	}
	fmt.Printf("VM %s (%s): %s, policy %q, keys %v, %s\n", st.Dir, st.Name, state, st.Policy, st.KEKs, lock)
	if st.Warning != "" {
		fmt.Println("warning:", st.Warning)
	}
	if st.Interrupted != "" {
		fmt.Printf("conversion interrupted: %s (run the same command again to finish, or with --abort to roll it back)\n", st.Interrupted)
	}
	for _, p := range st.Problems {
		fmt.Println("problem:", p)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FILE\tKIND\tENCRYPTED\tSIZE\tKEK\tDEK FINGERPRINT")
	for _, f := range st.Files {
		fmt.Fprintf(tw, "%s\t%s\t%v\t%d\t%s\t%s\n", f.Name, f.Kind, f.Encrypted, f.Size, f.KEK, f.Fingerprint)
	}
	return tw.Flush()
}

// convert runs a streamed VM operation with a progress bar on a terminal
// or JSON lines otherwise.
func (g *globals) convert(path string, req api.VMRequest, jsonOut bool, done string) error {
	if !jsonOut && !isTerminal(os.Stdout) {
		jsonOut = true
	}
	var (
		p   *mpb.Progress
		bar *mpb.Bar
	)
	onProgress := func(raw json.RawMessage) {
		if jsonOut {
			fmt.Printf("{\"progress\":%s}\n", raw)
			return
		}
		var ev api.Progress
		if json.Unmarshal(raw, &ev) != nil {
			return
		}
		if bar == nil {
			p = mpb.New(mpb.WithWidth(40), mpb.WithOutput(os.Stderr))
			bar = p.AddBar(ev.Total,
				mpb.PrependDecorators(decor.Name(ev.Op+" "), decor.CountersKibiByte("% .1f / % .1f")),
				mpb.AppendDecorators(decor.AverageSpeed(decor.SizeB1024(0), "% .1f"), decor.Name(" ETA "), decor.AverageETA(decor.ET_STYLE_GO)))
		}
		bar.SetCurrent(ev.Done)
	}
	var res api.VMStatusReply
	ctx, cancel := context.WithTimeout(context.Background(), 24*time.Hour)
	defer cancel()
	err := api.NewClient(g.socket).Stream(ctx, "POST", path, req, &res, onProgress)
	if bar != nil {
		if err == nil {
			bar.SetTotal(-1, true)
		} else {
			bar.Abort(false)
		}
		p.Wait()
	}
	if err != nil {
		return err
	}
	if jsonOut {
		raw, _ := json.Marshal(res)
		fmt.Printf("{\"result\":%s}\n", raw)
		return nil
	}
	fmt.Printf("%s: %s (keys %v)\n", filepath.Clean(req.Dir), done, res.KEKs)
	return nil
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

type policyCmd struct {
	List policyListCmd `cmd:"" help:"List storage policies: the two built-ins, or with [manager] the manager's policies (with the key provider each encrypting one resolves to)."`
	Set  policySetCmd  `cmd:"" help:"Set a VM's storage policy: encrypts or decrypts it accordingly. With [manager] the name is resolved by the manager (encrypt under the policy's provider, rekey onto it when the VM is encrypted under another, or decrypt) and the manager records the VM's policy; an unreachable manager changes nothing."`
}

type policyListCmd struct {
	JSON bool `help:"Print JSON." name:"json"`
}

func (c *policyListCmd) Run(g *globals) error {
	var ps []api.Policy
	if err := g.call("GET", "/policies", nil, &ps); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(ps)
	}
	for _, p := range ps {
		if p.Source == "" {
			fmt.Printf("%-22s %s\n", p.Name, p.Description)
			continue
		}
		what := "plain"
		if p.Encrypts {
			what = "encrypts under " + p.Provider
			if p.Provider == "" {
				what = "encrypts (provider NOT CONFIGURED)"
			}
		}
		fmt.Printf("%-22s %-32s %s (from the manager)\n", p.Name, what, p.Description)
	}
	return nil
}

type policySetCmd struct {
	Dir  string `arg:"" help:"VM directory." type:"path"`
	Name string `arg:"" help:"Policy name."`
	progressOpts
}

func (c *policySetCmd) Run(g *globals) error {
	return g.convert("/vm/policy", api.VMRequest{Dir: c.Dir, Policy: c.Name}, c.JSON, "policy "+c.Name)
}

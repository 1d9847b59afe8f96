package daemon

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/vmcryptd/vmcryptd/engine/vmops"
	"github.com/vmcryptd/vmcryptd/internal/api"
)

// hVMCheck verifies VM directories against their text files
// (vmops.VMOps.Check). Checking needs only System.Read: DEKs are
// unwrapped inside the daemon to authenticate headers and nothing but
// verdicts leaves it. --repair rewrites header slots and key lines, so it
// needs Cryptographer.Recrypt and Cryptographer.AddDisk, takes the VM
// lock and refuses a VM with files open through a view.
func (d *Daemon) hVMCheck(rc *reqCtx) (any, error) {
	var req api.CheckRequest
	if err := decode(rc, &req); err != nil {
		return nil, err
	}
	if req.Repair {
		for _, p := range []Privilege{PrivRecrypt, PrivAddDisk} {
			if !d.auth.allowed(rc.id, p) {
				return nil, forbidden("permission denied: vm check --repair needs privilege %s", p)
			}
		}
	}
	var dirs []string
	switch {
	case req.Dir != "" && req.Datastore != "":
		return nil, badRequest("give a VM directory or a datastore, not both")
	case req.Dir != "":
		dir, err := d.vmDir(req.Dir)
		if err != nil {
			return nil, err
		}
		dirs = []string{dir}
	case req.Datastore != "":
		root := ""
		for _, ds := range d.config().Datastores {
			if ds.Name == req.Datastore || ds.Path == req.Datastore {
				root = ds.Path
			}
		}
		if root == "" {
			return nil, notFound("no datastore %q in the configuration", req.Datastore)
		}
		var err error
		if dirs, err = vmDirsIn(root); err != nil {
			return nil, badRequest("datastore %s: %v", root, err)
		}
	default:
		return nil, badRequest("give a VM directory or --datastore")
	}
	ctx := context.WithoutCancel(rc.r.Context())
	reply := api.CheckReply{Reports: []api.CheckReport{}}
	for _, dir := range dirs {
		rep, err := d.checkOne(ctx, rc, dir, req.Repair)
		if err != nil {
			rep = &vmops.CheckReport{Dir: dir, Findings: []vmops.CheckFinding{{Problem: err.Error()}}}
		}
		reply.Reports = append(reply.Reports, wireCheckReport(rep))
	}
	return reply, nil
}

func (d *Daemon) checkOne(ctx context.Context, rc *reqCtx, dir string, repair bool) (*vmops.CheckReport, error) {
	if !repair {
		// Reading only: no VM lock, so a check never makes the views
		// refuse a running VM's opens (a conversion in progress shows
		// as an interrupted one).
		return d.vmOps(nil).Check(ctx, dir, false)
	}
	if err := d.acquireVM(dir, rc.op); err != nil {
		return nil, err
	}
	defer d.vmLocks.release(dir)
	if repair {
		if open := d.openFilesUnder(dir); len(open) > 0 {
			return nil, conflict("%s is in use: open through a decrypted view: %s; close them before --repair", dir, strings.Join(open, ", "))
		}
		defer d.forgetDEKs(dir)
	}
	return d.vmOps(nil).Check(ctx, dir, repair)
}

// vmDirsIn lists the directories directly under root that hold a .vmx.
func vmDirsIn(root string) ([]string, error) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		sub := filepath.Join(root, e.Name())
		if m, _ := filepath.Glob(filepath.Join(sub, "*.vmx")); len(m) > 0 {
			out = append(out, sub)
		}
	}
	sort.Strings(out)
	return out, nil
}

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/manager"
)

type statusCmd struct {
	JSON bool `help:"Print JSON." name:"json"`
}

func (s *statusCmd) Run(g *globals) error {
	var raw json.RawMessage
	if err := g.call("GET", "/status", nil, &raw); err != nil {
		return err
	}
	var probe struct {
		Service string `json:"service"`
	}
	json.Unmarshal(raw, &probe)
	if probe.Service == manager.Service {
		return printManagerStatus(raw, s.JSON)
	}
	var st api.Status
	if err := json.Unmarshal(raw, &st); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	if s.JSON {
		return printJSON(st)
	}
	fmt.Printf("vmcryptd %s, pid %d, up since %s\n", st.Version, st.PID, st.Started.Format("2006-01-02 15:04:05"))
	fmt.Printf("you: %s (uid %d), role %s\n", st.Caller.User, st.Caller.UID, orNone(st.Caller.Role))
	he := st.HostEncryption
	if he.Enabled {
		state := "loaded"
		if !he.KeyLoaded {
			state = "NOT loaded: " + orNone(he.Error)
		}
		fmt.Printf("host encryption mode: enabled (host key %s/%s, %s)\n", he.Provider, he.KeyID, state)
	} else {
		fmt.Println("host encryption mode: disabled")
	}
	switch ks := st.KeySource; ks.Mode {
	case "manager":
		reach := "reachable"
		if !ks.Reachable {
			reach = "NOT reachable: " + orNone(ks.Error)
		}
		fmt.Printf("key source: manager at %s as host %s (%s)\n", ks.Address, orNone(ks.Host), reach)
	default:
		fmt.Println("key source: direct (this host's own [[kms]] providers: trusted host)")
	}
	locked := "mlocked"
	if !st.KeysLocked {
		locked = "NOT mlocked (raise RLIMIT_MEMLOCK)"
	}
	fmt.Printf("keys in memory: %d (%s)\n", st.CachedKeys, locked)
	if !st.Ready {
		fmt.Println("starting: mounts and exports are still being restored")
	}
	switch {
	case st.KeySource.LockedByManager:
		fmt.Println("LOCKED by the manager: " + st.KeySource.LockReason)
	case st.Locked:
		fmt.Println("LOCKED by vmcryptd lock: no key is fetched until vmcryptd unlock")
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\nPROVIDER\tDEFAULT\tSOURCE\tSERVERS")
	for _, p := range st.Providers {
		def := ""
		if p.Default {
			def = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Name, def, p.Source, strings.Join(p.Servers, ", "))
	}
	if len(st.VMs) > 0 {
		fmt.Fprintln(tw, "\nVM\tSTATE\tKEYS\tREASON")
		for _, vm := range st.VMs {
			state := "unlocked"
			if vm.Locked {
				state = "locked"
			}
			if vm.State != "" {
				state += ", " + vm.State
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", vm.Dir, state, strings.Join(vm.Keys, ","), vm.Reason)
		}
		for _, vm := range st.VMs {
			if vm.Warning != "" {
				fmt.Fprintf(tw, "warning: VM %s: %s\n", vm.Dir, vm.Warning)
			}
		}
	}
	if len(st.Mounts) > 0 {
		fmt.Fprintln(tw, "\nMOUNTPOINT\tDATASTORE\tMODE\tOPEN FILES")
		for _, m := range st.Mounts {
			mode := "rw"
			if m.ReadOnly {
				mode = "ro"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", m.Mountpoint, m.Datastore, mode, len(m.OpenFiles))
		}
	}
	if len(st.ViewLatency) > 0 {
		fmt.Fprintln(tw, "\nVIEW LATENCY (since start)\tCOUNT\tMEAN\tP50 <=\tP99 <=")
		for _, l := range st.ViewLatency {
			what := "fuse " + l.Op
			if l.Kind == "io" {
				what = "encrypted " + l.Op
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", what, l.Count, fmtMicros(l.MeanMicros), fmtMicros(l.P50Micros), fmtMicros(l.P99Micros))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(st.Exports) > 0 {
		fmt.Println()
		printExports(st.Exports)
	}
	return nil
}

// fmtMicros shows a latency in microseconds as 12µs, 3.4ms or 1.20s; a
// negative one is beyond the histograms' largest bucket.
func fmtMicros(us float64) string {
	switch {
	case us < 0:
		return ">1s"
	case us < 1000:
		return fmt.Sprintf("%.0fµs", us)
	case us < 1e6:
		return fmt.Sprintf("%.1fms", us/1000)
	}
	return fmt.Sprintf("%.2fs", us/1e6)
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

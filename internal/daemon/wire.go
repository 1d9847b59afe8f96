package daemon

import (
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
	"github.com/vmcryptd/vmcryptd/internal/api"
)

// The engine's results in the API's wire types (internal/api owns every
// type the socket carries).

func wireVMStatus(st *vm.VMStatus) api.VMStatus {
	out := api.VMStatus{Dir: st.Dir, Name: st.Name, Encrypted: st.Encrypted, VMID: st.VMID, Policy: st.Policy,
		KEKs: st.KEKs, Interrupted: string(st.Interrupted), Snapshots: st.Snapshots,
		Files: make([]api.FileStatus, len(st.Files)), Problems: st.Problems}
	for i, f := range st.Files {
		out.Files[i] = api.FileStatus{Name: f.Name, Kind: f.Kind, Disk: f.Disk, Encrypted: f.Encrypted,
			KEK: f.KEK, Fingerprint: f.Fingerprint, Size: f.Size}
	}
	return out
}

func wireProgress(ev vmops.ProgressEvent) api.Progress {
	return api.Progress{Op: string(ev.Op), File: ev.File, Done: ev.Done, Total: ev.Total}
}

func wireFinding(f vmops.CheckFinding) api.CheckFinding {
	return api.CheckFinding{File: f.File, Problem: f.Problem, Repairable: f.Repairable}
}

func wireCheckReport(r *vmops.CheckReport) api.CheckReport {
	out := api.CheckReport{Dir: r.Dir, Checked: r.Checked, Repaired: r.Repaired, Findings: make([]api.CheckFinding, len(r.Findings))}
	for i, f := range r.Findings {
		out.Findings[i] = wireFinding(f)
	}
	return out
}

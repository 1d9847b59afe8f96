// Package api is the daemon's HTTP/JSON interface on its unix socket: the
// request and response types and a client. Paths are versioned ("/v1/...");
// errors are {"error": "...", "missing_privilege": "..."} with an HTTP
// status (400 bad request, 403 denied, 404 unknown, 409 conflict, 500).
package api

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/vmcryptd/vmcryptd/kms"
)

// Prefix of every path of this API version.
const Prefix = "/v1"

// MaxRequestBytes bounds a request body; larger ones get 400.
const MaxRequestBytes = 1 << 20

// Error is the body of every non-2xx response.
type Error struct {
	Error            string    `json:"error"`
	MissingPrivilege string    `json:"missing_privilege,omitempty"`
	Kind             ErrorKind `json:"kind,omitempty"`
}

// ErrorKind is what an error answer is about, for callers that act on it
// (the CLI's exit codes). Empty: any other failure.
type ErrorKind string

const (
	KindDenied         ErrorKind = "denied"          // a privilege is missing
	KindKeyUnavailable ErrorKind = "key_unavailable" // a KEK is not in memory (locked, KMS or manager down, unknown key)
	KindInterrupted    ErrorKind = "interrupted"     // the VM has an unfinished conversion: re-run or --abort
	KindRefused        ErrorKind = "refused"         // a file refused by the VM's files (FORMAT.md 5)
)

// Status is GET /v1/status.
type Status struct {
	Version        string         `json:"version"`
	PID            int            `json:"pid"`
	Started        time.Time      `json:"started"`
	Caller         Caller         `json:"caller"`
	HostEncryption HostEncryption `json:"host_encryption"`
	KeySource      KeySource      `json:"key_source"`
	Providers      []ProviderInfo `json:"providers"`
	DefaultKMS     string         `json:"default_provider,omitempty"`
	CachedKeys     int            `json:"cached_keys"`
	KeysLocked     bool           `json:"keys_mlocked"`
	// Locked is set while `vmcryptd lock` is in force: no key is in
	// memory or fetched until `vmcryptd unlock`.
	Locked bool `json:"locked"`
	// Ready is false while the daemon, just started, is still restoring
	// its configured and remembered mounts and exports; once true each
	// of them is either served or listed with its error.
	Ready      bool             `json:"ready"`
	VMs        []VMLockState    `json:"vms"`
	Mounts     []MountInfo      `json:"mounts"`
	Exports    []ExportInfo     `json:"exports"`
	Datastores []DatastoreState `json:"datastores"`
	// ViewLatency summarises the views' latency histograms since the
	// daemon started (docs/METRICS.md): data paths first, then FUSE
	// operations; only those seen at least once.
	ViewLatency []ViewLatency `json:"view_latency,omitempty"`
}

// ViewLatency is one latency histogram of the views, summarised. P50 and
// P99 are the upper bounds of the histogram buckets holding those
// quantiles (the quantile is at most that); -1 means beyond the largest
// bucket (about 1 s).
type ViewLatency struct {
	Kind       string  `json:"kind"` // "io": encrypted data path; "op": FUSE operation
	Op         string  `json:"op"`
	Count      uint64  `json:"count"`
	MeanMicros float64 `json:"mean_us"`
	P50Micros  float64 `json:"p50_us"`
	P99Micros  float64 `json:"p99_us"`
}

// Caller is who the daemon thinks is asking (from SO_PEERCRED).
type Caller struct {
	UID        int      `json:"uid"`
	User       string   `json:"user"`
	Role       string   `json:"role"`
	Privileges []string `json:"privileges"`
}

// KeySource is where the host gets its KEKs: "direct" (its own [[kms]]
// providers: a trusted host) or "manager" (the manager brokers every key;
// the host holds no KMS credential).
type KeySource struct {
	Mode string `json:"mode"`
	// Manager mode only:
	Address   string    `json:"address,omitempty"`
	Host      string    `json:"host,omitempty"` // this host's name at the manager
	Reachable bool      `json:"reachable"`
	LastOK    time.Time `json:"last_ok,omitzero"`
	Error     string    `json:"error,omitempty"`
	// LockedByManager is set while the manager holds this host locked
	// (`vmcryptd manager host lock`), with its reason.
	LockedByManager bool   `json:"locked_by_manager,omitempty"`
	LockReason      string `json:"lock_reason,omitempty"`
}

// VMRegisterRequest is POST /v1/vm/register and /v1/vm/unregister.
type VMRegisterRequest struct {
	Dir string `json:"dir"`
}

// VMRegisterReply answers them.
type VMRegisterReply struct {
	Dir        string   `json:"dir"`
	VMID       string   `json:"vm_id"`
	Keys       []string `json:"keys"`
	Registered bool     `json:"registered"`
	// Manager is "registered", "unregistered" or "" (direct mode).
	Manager string `json:"manager,omitempty"`
}

// HostEncryption is the host's encryption mode.
type HostEncryption struct {
	Enabled   bool   `json:"enabled"`
	Provider  string `json:"provider,omitempty"`
	KeyID     string `json:"key_id,omitempty"`
	KeyLoaded bool   `json:"key_loaded"`
	Error     string `json:"error,omitempty"`
}

// HostEncryptionRequest is POST /v1/host/encryption.
type HostEncryptionRequest struct {
	Enable   bool   `json:"enable"`
	Provider string `json:"provider,omitempty"` // default provider if empty
}

// ProviderInfo describes a key provider.
type ProviderInfo struct {
	Name    string   `json:"name"`
	Servers []string `json:"servers"`
	Default bool     `json:"default"`
	Source  string   `json:"source"` // "config" or "api"
}

// ProviderAdd is POST /v1/kms.
type ProviderAdd struct {
	Name     string   `json:"name"`
	Servers  []string `json:"servers"`
	CAFile   string   `json:"ca_file"`
	CertFile string   `json:"cert_file"`
	KeyFile  string   `json:"key_file"`
	Default  bool     `json:"default"`
	// TLSCipherSuites: kms.Config.TLSCipherSuites.
	TLSCipherSuites []string `json:"tls_cipher_suites,omitempty"`
}

// ProviderStatus is the status of one provider.
type ProviderStatus struct {
	Name    string             `json:"name"`
	Servers []kms.ServerStatus `json:"servers"`
}

// VMLockState is whether the daemon holds every key a VM needs.
type VMLockState struct {
	Dir    string   `json:"dir"`
	Name   string   `json:"name,omitempty"`
	Locked bool     `json:"locked"`
	Reason string   `json:"reason,omitempty"`
	Keys   []string `json:"keys"`
	State  string   `json:"state,omitempty"` // e.g. "conversion interrupted"
	// Warning names a KEK of the VM held in a revoked state (unwrap only).
	Warning string `json:"warning,omitempty"`
}

// DatastoreState is a configured datastore.
type DatastoreState struct {
	Name string `json:"name"`
	Path string `json:"path"`
}

// VMRequest is the body of the VM operations (POST /v1/vm/encrypt,
// /decrypt, /rekey, /policy).
type VMRequest struct {
	Dir      string `json:"dir"`
	Provider string `json:"provider,omitempty"`
	KeyID    string `json:"key_id,omitempty"`
	Deep     bool   `json:"deep,omitempty"`
	Policy   string `json:"policy,omitempty"`
	// Abort rolls the VM's interrupted conversion of this kind back
	// instead (encrypt, decrypt, or deep rekey for /vm/rekey).
	Abort bool `json:"abort,omitempty"`
}

// StreamLine is one line of a streamed (application/x-ndjson) answer:
// progress lines, then exactly one line with Result or Error.
type StreamLine struct {
	Progress json.RawMessage `json:"progress,omitempty"`
	Result   json.RawMessage `json:"result,omitempty"`
	Error    string          `json:"error,omitempty"`
	Code     int             `json:"code,omitempty"`
	Kind     ErrorKind       `json:"kind,omitempty"`
}

// VMStatusReply is GET /v1/vm/status?dir=...
type VMStatusReply struct {
	VMStatus
	Locked     bool   `json:"locked"`
	LockReason string `json:"lock_reason,omitempty"`
	// Warning names a KEK of the VM held in a revoked state (unwrap only).
	Warning string `json:"warning,omitempty"`
}

// Policy is a storage policy (GET /v1/policies).
type Policy struct {
	Name        string `json:"name"`
	Encrypts    bool   `json:"encrypts"`
	Description string `json:"description"`
	// With [manager]: the policies are the manager's; Provider is the key
	// provider an encrypting one resolves to, Builtin marks the two
	// built-ins, Source is "manager".
	Provider string `json:"provider,omitempty"`
	Builtin  bool   `json:"builtin,omitempty"`
	Source   string `json:"source,omitempty"`
}

// DiskRequest is POST /v1/disk/add, /v1/disk/attach and /v1/disk/restore-keys.
type DiskRequest struct {
	Dir       string `json:"dir"`
	Size      int64  `json:"size,omitempty"`
	Subformat string `json:"subformat,omitempty"`
	Path      string `json:"path,omitempty"`
}

// DiskReply names the disk added, attached or whose keys were restored
// (DiskID: the disk id restore-keys adopted).
type DiskReply struct {
	Name      string `json:"name"`
	Encrypted bool   `json:"encrypted"`
	DiskID    string `json:"disk_id,omitempty"`
}

// DiskSpec is one disk of a new VM.
type DiskSpec struct {
	Size      int64  `json:"size"`
	Subformat string `json:"subformat,omitempty"`
}

// CreateRequest is POST /v1/vm/create.
type CreateRequest struct {
	Dir      string     `json:"dir"`
	Name     string     `json:"name"`
	Memory   int64      `json:"memory"`
	Disks    []DiskSpec `json:"disks"`
	Encrypt  bool       `json:"encrypt"`
	Provider string     `json:"provider,omitempty"`
}

// MountRequest is POST /v1/mounts.
type MountRequest struct {
	Datastore  string `json:"datastore"` // name or path
	Mountpoint string `json:"mountpoint"`
	ReadOnly   bool   `json:"read_only,omitempty"`
	AllowOther bool   `json:"allow_other,omitempty"`
}

// UnmountRequest is POST /v1/unmount.
type UnmountRequest struct {
	Mountpoint string `json:"mountpoint"`
	Force      bool   `json:"force,omitempty"`
}

// MountInfo describes one decrypted view.
type MountInfo struct {
	Datastore  string   `json:"datastore"`
	Mountpoint string   `json:"mountpoint"`
	ReadOnly   bool     `json:"read_only"`
	OpenFiles  []string `json:"open_files,omitempty"`
}

// ExportRequest is POST /v1/exports: serve a virtual disk over NBD on a
// unix socket or, with mutual TLS, on TCP.
type ExportRequest struct {
	Disk     string `json:"disk"` // absolute path of the .vmdk descriptor
	Unix     string `json:"unix,omitempty"`
	TCP      string `json:"tcp,omitempty"` // host:port
	Name     string `json:"name,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
	// TLS files (PEM) for TCP: the server's certificate and key, and the
	// CA that client certificates must chain to.
	TLSCert string `json:"tls_cert,omitempty"`
	TLSKey  string `json:"tls_key,omitempty"`
	TLSCA   string `json:"tls_ca,omitempty"`
}

// ExportStopRequest is POST /v1/exports/stop: by name, socket path, TCP
// address or disk path.
type ExportStopRequest struct {
	Target string `json:"target"`
}

// ExportInfo describes one NBD export.
type ExportInfo struct {
	Name        string `json:"name"`
	Disk        string `json:"disk"`
	Unix        string `json:"unix,omitempty"`
	TCP         string `json:"tcp,omitempty"`
	ReadOnly    bool   `json:"read_only"`
	Size        int64  `json:"size"`
	CreateType  string `json:"create_type,omitempty"`
	Connections int    `json:"connections"`
	URI         string `json:"uri"`
	// Error is set for a remembered export that could not be
	// re-established after a restart (it is retried by export start).
	Error string `json:"error,omitempty"`
}

// CheckRequest is POST /v1/vm/check: one VM directory, or every VM
// directory of a configured datastore.
type CheckRequest struct {
	Dir       string `json:"dir,omitempty"`
	Datastore string `json:"datastore,omitempty"`
	Repair    bool   `json:"repair,omitempty"`
}

// CheckReply holds one report per VM directory checked.
type CheckReply struct {
	Reports []CheckReport `json:"reports"`
}

// VMStatus is a VM directory's encryption state, as vm status shows it.
type VMStatus struct {
	Dir         string       `json:"dir"`
	Name        string       `json:"name,omitempty"`
	Encrypted   bool         `json:"encrypted"`
	VMID        string       `json:"vm_id,omitempty"`
	Policy      string       `json:"policy"`
	KEKs        []string     `json:"keks"` // provider/key id of every KEK the VM needs
	Interrupted string       `json:"interrupted,omitempty"`
	Snapshots   int          `json:"snapshots"`
	Files       []FileStatus `json:"files"`
	// Problems are one-line findings that need the admin's attention
	// but do not stop the VM from being used.
	Problems []string `json:"problems,omitempty"`
}

// FileStatus is one data file of a VM.
type FileStatus struct {
	Name        string `json:"name"`
	Kind        string `json:"kind"`
	Disk        string `json:"disk,omitempty"`
	Encrypted   bool   `json:"encrypted"`
	KEK         string `json:"kek,omitempty"`
	Fingerprint string `json:"dek_fingerprint,omitempty"`
	Size        int64  `json:"size"`
}

// Progress is one progress line of a streamed conversion.
type Progress struct {
	Op    string `json:"op"`    // "encrypt", "decrypt" or "rekey-deep"
	File  string `json:"file"`  // the file being converted
	Done  int64  `json:"done"`  // bytes of all files so far
	Total int64  `json:"total"` // bytes of all files to convert
}

// CheckReport is the result of vm check for one VM directory: what was
// repaired (with --repair) and the findings that remain. A VM is healthy
// when Findings is empty.
type CheckReport struct {
	Dir      string         `json:"dir"`
	Checked  int            `json:"containers_checked"`
	Repaired []string       `json:"repaired,omitempty"`
	Findings []CheckFinding `json:"findings"`
}

// CheckFinding is one problem vm check found.
type CheckFinding struct {
	File       string `json:"file,omitempty"`
	Problem    string `json:"problem"`
	Repairable bool   `json:"repairable"`
}

// String is the one line the CLI prints for f.
func (f CheckFinding) String() string {
	s := f.Problem
	if f.File != "" {
		s = f.File + ": " + s
	}
	if f.Repairable {
		s += " (vm check --repair fixes this)"
	}
	return s
}

// Summary is the one line the CLI prints after r's findings.
func (r CheckReport) Summary() string {
	if len(r.Findings) == 0 {
		return fmt.Sprintf("%s: ok (%d containers verified)", r.Dir, r.Checked)
	}
	n := 0
	for _, f := range r.Findings {
		if f.Repairable {
			n++
		}
	}
	s := fmt.Sprintf("%s: %d problem(s)", r.Dir, len(r.Findings))
	if n > 0 {
		s += fmt.Sprintf(", %d repairable with --repair", n)
	}
	return s
}

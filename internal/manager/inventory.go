package manager

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

// inventory is what the manager remembers across restarts: hosts and
// their certificate serials, VM registrations and the key ids it knows,
// never key material. It is written atomically after every change
// (internal/atomicfile: write new, fsync, rename, fsync dir).
type inventory struct {
	Version int                   `json:"version"`
	Hosts   map[string]*hostRec   `json:"hosts"`
	VMs     map[string]*vmRec     `json:"vms"`  // by vmcryptd VM id
	Keys    map[string]*keyRec    `json:"keys"` // by "provider/key id"
	Revoked map[string]revokedRec `json:"revoked"`
	// Policies are the storage policies made with `manager policy
	// create`, by name (the two built-ins are not stored). Absent in an
	// inventory written before storage policies: none.
	Policies map[string]*policyRec `json:"policies,omitempty"`
}

type hostRec struct {
	Name    string    `json:"name"`
	Address string    `json:"address,omitempty"`
	Serial  string    `json:"serial"` // hex serial of its current certificate
	Added   time.Time `json:"added"`
	// Lock is set by `manager host lock`: the host must zero every key
	// and is handed none until `manager host unlock`.
	Lock *hostLock `json:"lock,omitempty"`
}

type hostLock struct {
	At  time.Time `json:"at"`
	UID int       `json:"uid"`
	By  string    `json:"by"`
}

type vmRec struct {
	ID         string            `json:"id"`
	Name       string            `json:"name,omitempty"`
	Dir        string            `json:"dir,omitempty"`
	Host       string            `json:"host"`
	Keys       []mgrproto.KeyRef `json:"keys"`
	Registered time.Time         `json:"registered"`
	// Policy is the VM's storage policy (registeredPolicy); empty in an
	// inventory written before storage policies: VM Encryption Policy.
	Policy string `json:"policy,omitempty"`
}

// keyRec is a KEK the manager knows: made through it, or named by a VM
// registration it accepted.
type keyRec struct {
	Ref mgrproto.KeyRef `json:"ref"`
	// CreatedFor is the host that had it made and has not yet bound it to
	// a registered VM (a key being put on a VM, or a host key); "" once
	// bound.
	CreatedFor string    `json:"created_for,omitempty"`
	Created    time.Time `json:"created"`
}

type revokedRec struct {
	Host    string    `json:"host"`
	Revoked time.Time `json:"revoked"`
}

const inventoryVersion = 1

func newInventory() *inventory {
	return &inventory{Version: inventoryVersion, Hosts: map[string]*hostRec{}, VMs: map[string]*vmRec{},
		Keys: map[string]*keyRec{}, Revoked: map[string]revokedRec{}, Policies: map[string]*policyRec{}}
}

func loadInventory(path string) (*inventory, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return newInventory(), nil
	}
	if err != nil {
		return nil, fmt.Errorf("inventory %s: %w", path, err)
	}
	inv := newInventory()
	if err := json.Unmarshal(raw, inv); err != nil {
		return nil, fmt.Errorf("inventory %s: %w", path, err)
	}
	if inv.Version != inventoryVersion {
		return nil, fmt.Errorf("inventory %s: version %d, this vmcryptd reads %d", path, inv.Version, inventoryVersion)
	}
	for _, m := range []bool{inv.Hosts == nil, inv.VMs == nil, inv.Keys == nil, inv.Revoked == nil} {
		if m {
			return nil, fmt.Errorf("inventory %s: incomplete (a section is missing)", path)
		}
	}
	if inv.Policies == nil {
		inv.Policies = map[string]*policyRec{}
	}
	for name, p := range inv.Policies {
		if p == nil || p.Name != name {
			return nil, fmt.Errorf("inventory %s: policy %q: record does not match its name", path, name)
		}
		if _, bi := builtinPolicy(name); bi {
			return nil, fmt.Errorf("inventory %s: policy %q shadows a built-in policy", path, name)
		}
	}
	return inv, nil
}

func (inv *inventory) save(path string) error {
	b, err := json.MarshalIndent(inv, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("inventory %s: %w", path, err)
	}
	return nil
}

// clone is a deep copy, so a change can be made on a copy, saved, and
// only then made visible: a failed save changes nothing.
func (inv *inventory) clone() *inventory {
	b, err := json.Marshal(inv)
	if err != nil {
		panic(err) // plain data: cannot fail
	}
	out := newInventory()
	if err := json.Unmarshal(b, out); err != nil {
		panic(err)
	}
	return out
}

// vmsOf lists the ids of the VMs registered to host.
func (inv *inventory) vmsOf(host string) []*vmRec {
	var out []*vmRec
	for _, vm := range inv.VMs {
		if vm.Host == host {
			out = append(out, vm)
		}
	}
	return out
}

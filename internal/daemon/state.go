package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/kms"
)

// state is what the daemon remembers across restarts: key ids and
// registrations, never key material. Written atomically.
type state struct {
	Version int `json:"version"`
	// HostKey is the host encryption mode key (nil when the mode is off).
	HostKey *keyRefJSON `json:"host_key,omitempty"`
	// Providers added through the API (`vmcryptd kms add`); the config
	// file's providers are not copied here.
	Providers []kms.Config `json:"providers,omitempty"`
	// DefaultProvider set through the API overrides the config's.
	DefaultProvider string `json:"default_provider,omitempty"`
	// VMs registered with the daemon (encrypted ones), by directory.
	VMs []vmRecord `json:"vms,omitempty"`
	// Mounts made through the API, re-established after a restart.
	Mounts []mountRecord `json:"mounts,omitempty"`
	// Exports (NBD) started through the API, re-established after a
	// restart.
	Exports []exportRecord `json:"exports,omitempty"`
}

type keyRefJSON struct {
	Provider string `json:"provider"`
	KeyID    string `json:"key_id"`
}

type vmRecord struct {
	Dir  string       `json:"dir"`
	VMID string       `json:"vm_id,omitempty"` // the vmx's vmcryptd.vmId (the manager's key)
	Name string       `json:"name,omitempty"`
	Keys []keyRefJSON `json:"keys"`
	// Policy is the manager's storage policy `policy set` put the VM
	// under (manager mode only; re-sent with its registration).
	Policy string `json:"policy,omitempty"`
}

const stateVersion = 1

func loadState(path string) (*state, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return &state{Version: stateVersion}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state %s: %w", path, err)
	}
	var s state
	if err := json.Unmarshal(raw, &s); err != nil {
		return nil, fmt.Errorf("state %s: %w", path, err)
	}
	if s.Version != stateVersion {
		return nil, fmt.Errorf("state %s: version %d, this vmcryptd reads %d", path, s.Version, stateVersion)
	}
	return &s, nil
}

func (s *state) save(path string) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'), 0o600)
}

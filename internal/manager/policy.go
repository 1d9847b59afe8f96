package manager

import (
	"fmt"
	"slices"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

// The need-to-know decisions. Each is a pure function of the inventory
// and the request, table-tested in policy_test.go.

// checkHost decides whether a peer certificate (subject CN and hex
// serial; the CA already verified it) belongs to a current host.
func checkHost(inv *inventory, cn, serial string) error {
	if r, ok := inv.Revoked[serial]; ok {
		return fmt.Errorf("host certificate %s of %q was revoked at %s (host removed): this host is cut off", serial, r.Host, r.Revoked.UTC().Format("2006-01-02 15:04:05Z"))
	}
	h, ok := inv.Hosts[cn]
	if !ok {
		return fmt.Errorf("host %q is not in the manager's inventory (add it with 'vmcryptd manager host add %s')", cn, cn)
	}
	if h.Serial != serial {
		return fmt.Errorf("host %q presented certificate %s, but its current certificate is %s", cn, serial, h.Serial)
	}
	return nil
}

// hostLocked refuses every key to a host the manager has locked
// (`manager host lock`); nil for a host that is not locked.
func hostLocked(inv *inventory, host string) error {
	h, ok := inv.Hosts[host]
	if !ok || h.Lock == nil {
		return nil
	}
	return fmt.Errorf("host %q is locked by the manager (by %s at %s): no key is handed to it until 'vmcryptd manager host unlock %s'", host, h.Lock.By, h.Lock.At.UTC().Format("2006-01-02 15:04:05Z"), host)
}

// entitled reports whether host may hold key ref: a VM registered to
// host needs it, or host had it made and has not bound it to a VM yet
// (a VM being encrypted, or the host key).
func entitled(inv *inventory, host string, ref mgrproto.KeyRef) bool {
	if k, ok := inv.Keys[ref.String()]; ok && k.CreatedFor == host {
		return true
	}
	for _, vm := range inv.VMs {
		if vm.Host == host && slices.Contains(vm.Keys, ref) {
			return true
		}
	}
	return false
}

// holders names the other hosts entitled to ref, for a denial's reason.
func holders(inv *inventory, host string, ref mgrproto.KeyRef) []string {
	seen := map[string]bool{}
	var out []string
	add := func(h string) {
		if h != "" && h != host && !seen[h] {
			seen[h] = true
			out = append(out, h)
		}
	}
	if k, ok := inv.Keys[ref.String()]; ok {
		add(k.CreatedFor)
	}
	for _, vm := range inv.VMs {
		if slices.Contains(vm.Keys, ref) {
			add(vm.Host)
		}
	}
	slices.Sort(out)
	return out
}

// mayGetKey decides a get_key: the key must be one host is entitled to;
// when the request names the VM it is for, that VM must be registered to
// host and need the key.
func mayGetKey(inv *inventory, host string, ref mgrproto.KeyRef, vmID string) error {
	if vmID != "" {
		vm, ok := inv.VMs[vmID]
		switch {
		case !ok:
			return fmt.Errorf("VM %s is not registered to any host", vmID)
		case vm.Host != host:
			return fmt.Errorf("VM %s is registered to host %q, not %q", vmID, vm.Host, host)
		case !slices.Contains(vm.Keys, ref):
			return fmt.Errorf("VM %s does not use key %s", vmID, ref)
		}
		return nil
	}
	if entitled(inv, host, ref) {
		return nil
	}
	if _, known := inv.Keys[ref.String()]; !known {
		return fmt.Errorf("key %s is not known to the manager: no VM registered to host %q uses it", ref, host)
	}
	if others := holders(inv, host, ref); len(others) > 0 {
		return fmt.Errorf("host %q has no VM that needs key %s (it belongs to host %s)", host, ref, quoteList(others))
	}
	return fmt.Errorf("host %q has no VM that needs key %s (register the VM first)", host, ref)
}

// mayRegister decides a register_vm: the VM id must not be registered to
// another host, and every key it names must be known to the manager and
// not held by another host (a key made for host, one a VM of host already
// uses, or one no host holds now).
func mayRegister(inv *inventory, host string, vm mgrproto.VM) error {
	if cur, ok := inv.VMs[vm.ID]; ok && cur.Host != host {
		return fmt.Errorf("VM %s is registered to host %q: unregister it there first", vm.ID, cur.Host)
	}
	for _, ref := range vm.Keys {
		if _, known := inv.Keys[ref.String()]; !known {
			return fmt.Errorf("VM %s names key %s, which the manager does not know (keys are made through the manager)", vm.ID, ref)
		}
		if entitled(inv, host, ref) {
			continue
		}
		if others := holders(inv, host, ref); len(others) > 0 {
			return fmt.Errorf("VM %s names key %s, which belongs to host %s", vm.ID, ref, quoteList(others))
		}
	}
	return nil
}

// mayUnregister decides an unregister_vm: only the VM's host may.
func mayUnregister(inv *inventory, host, vmID string) error {
	if cur, ok := inv.VMs[vmID]; ok && cur.Host != host {
		return fmt.Errorf("VM %s is registered to host %q, not %q", vmID, cur.Host, host)
	}
	return nil
}

func quoteList(l []string) string {
	s := ""
	for i, h := range l {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%q", h)
	}
	return s
}

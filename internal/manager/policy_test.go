package manager

import (
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

func policyInventory() *inventory {
	inv := newInventory()
	k := func(id, createdFor string) mgrproto.KeyRef {
		ref := mgrproto.KeyRef{Provider: "kms", KeyID: id}
		inv.Keys[ref.String()] = &keyRec{Ref: ref, CreatedFor: createdFor}
		return ref
	}
	k1, k2 := k("k1", ""), k("k2", "")
	k("pending1", "host1")
	k("orphan", "")
	inv.Hosts["host1"] = &hostRec{Name: "host1", Serial: "aa"}
	inv.Hosts["host2"] = &hostRec{Name: "host2", Serial: "bb"}
	inv.Revoked["cc"] = revokedRec{Host: "host3", Revoked: time.Unix(0, 0)}
	inv.VMs["vm1"] = &vmRec{ID: "vm1", Host: "host1", Keys: []mgrproto.KeyRef{k1}}
	inv.VMs["vm2"] = &vmRec{ID: "vm2", Host: "host2", Keys: []mgrproto.KeyRef{k2}}
	return inv
}

func ref(id string) mgrproto.KeyRef { return mgrproto.KeyRef{Provider: "kms", KeyID: id} }

func TestCheckHost(t *testing.T) {
	inv := policyInventory()
	for _, c := range []struct{ cn, serial, want string }{
		{"host1", "aa", ""},
		{"host1", "bb", "current certificate is aa"},
		{"host3", "cc", "revoked"},
		{"host1", "cc", "revoked"},
		{"ghost", "dd", "not in the manager's inventory"},
	} {
		check(t, c.cn+"/"+c.serial, checkHost(inv, c.cn, c.serial), c.want)
	}
}

func TestMayGetKey(t *testing.T) {
	inv := policyInventory()
	for _, c := range []struct {
		host, key, vm, want string
	}{
		{"host1", "k1", "", ""},
		{"host1", "k1", "vm1", ""},
		{"host1", "pending1", "", ""}, // made for host1, not yet on a VM
		{"host2", "k1", "", `belongs to host "host1"`},
		{"host2", "k1", "vm1", `registered to host "host1"`},
		{"host2", "pending1", "", `belongs to host "host1"`},
		{"host1", "k2", "vm1", "does not use key"},
		{"host1", "k1", "vm9", "not registered"},
		{"host1", "orphan", "", "register the VM first"},
		{"host1", "unknown", "", "not known to the manager"},
	} {
		check(t, c.host+" "+c.key+" "+c.vm, mayGetKey(inv, c.host, ref(c.key), c.vm), c.want)
	}
}

func TestMayRegister(t *testing.T) {
	inv := policyInventory()
	vm := func(id string, keys ...string) mgrproto.VM {
		v := mgrproto.VM{ID: id}
		for _, k := range keys {
			v.Keys = append(v.Keys, ref(k))
		}
		return v
	}
	for _, c := range []struct {
		host string
		vm   mgrproto.VM
		want string
	}{
		{"host1", vm("vm1", "k1"), ""},       // again: idempotent
		{"host1", vm("vm3", "pending1"), ""}, // its own new key
		{"host1", vm("vm3", "k1"), ""},       // a key one of its VMs uses
		{"host2", vm("vm3", "orphan"), ""},   // a key nobody holds
		{"host2", vm("vm1", "k1"), `registered to host "host1"`},
		{"host2", vm("vm3", "k1"), `belongs to host "host1"`}, // forged VM id, host1's key
		{"host2", vm("vm3", "pending1"), `belongs to host "host1"`},
		{"host1", vm("vm3", "nokey"), "does not know"},
	} {
		check(t, c.host+" "+c.vm.ID, mayRegister(inv, c.host, c.vm), c.want)
	}
	check(t, "unregister own", mayUnregister(inv, "host1", "vm1"), "")
	check(t, "unregister unknown", mayUnregister(inv, "host1", "vm9"), "")
	check(t, "unregister other's", mayUnregister(inv, "host2", "vm1"), `registered to host "host1"`)
}

func TestRoleAllows(t *testing.T) {
	for _, c := range []struct {
		role, priv string
		want       bool
	}{
		{"Administrator", PrivRegisterHost, true},
		{"Administrator", PrivRead, true},
		{"Administrator", PrivManagePolicy, true},
		{"ReadOnly", PrivManagePolicy, false},
		{"NoCryptoAdmin", PrivManagePolicy, false},
		{"NoCryptoAdmin", PrivRead, true},
		{"", PrivManagePolicy, false},
		{"ReadOnly", PrivRead, true},
		{"ReadOnly", PrivRegisterHost, false},
		{"NoCryptoAdmin", PrivRegisterHost, false},
		{"", PrivRead, false},
	} {
		if got := roleAllows(c.role, c.priv); got != c.want {
			t.Errorf("roleAllows(%q, %q) = %v, want %v", c.role, c.priv, got, c.want)
		}
	}
}

func check(t *testing.T, name string, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Errorf("%s: %v, want nil", name, err)
	case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
		t.Errorf("%s: %v, want an error containing %q", name, err, want)
	}
}

func TestHostLocked(t *testing.T) {
	inv := policyInventory()
	inv.Hosts["host2"].Lock = &hostLock{At: time.Unix(0, 0), By: "root"}
	for _, c := range []struct{ host, want string }{
		{"host1", ""},
		{"host2", "locked by the manager (by root"},
		{"ghost", ""}, // not a host: checkHost refuses it first
	} {
		check(t, c.host, hostLocked(inv, c.host), c.want)
	}
}

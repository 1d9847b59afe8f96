package daemon

import (
	"fmt"
	"os/user"
	"sort"
	"strconv"
	"sync"

	"github.com/vmcryptd/vmcryptd/internal/config"
)

// Privilege is one permission, named as in vSphere where one exists.
type Privilege string

// The cryptographic privileges, modelled on vSphere's Cryptographer.* set.
const (
	PrivAccess                 Privilege = "Cryptographer.Access" // decrypted views (mount)
	PrivEncrypt                Privilege = "Cryptographer.Encrypt"
	PrivEncryptNew             Privilege = "Cryptographer.EncryptNew"
	PrivDecrypt                Privilege = "Cryptographer.Decrypt"
	PrivRecrypt                Privilege = "Cryptographer.Recrypt"
	PrivAddDisk                Privilege = "Cryptographer.AddDisk"
	PrivMigrate                Privilege = "Cryptographer.Migrate"
	PrivClone                  Privilege = "Cryptographer.Clone"
	PrivManageKeys             Privilege = "Cryptographer.ManageKeys"
	PrivManageKeyServers       Privilege = "Cryptographer.ManageKeyServers"
	PrivManageEncryptionPolicy Privilege = "Cryptographer.ManageEncryptionPolicy"
	PrivRegisterHost           Privilege = "Cryptographer.RegisterHost"
	PrivRegisterVM             Privilege = "Cryptographer.RegisterVM"
)

// Non-cryptographic privileges: what a "No Cryptography Administrator"
// keeps.
const (
	PrivRead      Privilege = "System.Read"           // status, inspect, lists
	PrivVMConfig  Privilege = "VirtualMachine.Config" // plain VM operations
	PrivInventory Privilege = "VirtualMachine.Inventory"
)

var cryptoPrivs = []Privilege{PrivAccess, PrivEncrypt, PrivEncryptNew, PrivDecrypt, PrivRecrypt, PrivAddDisk,
	PrivMigrate, PrivClone, PrivManageKeys, PrivManageKeyServers, PrivManageEncryptionPolicy, PrivRegisterHost, PrivRegisterVM}

var plainPrivs = []Privilege{PrivRead, PrivVMConfig, PrivInventory}

// Built-in roles.
const (
	RoleAdministrator = "Administrator"
	RoleNoCryptoAdmin = "NoCryptoAdmin"
	RoleReadOnly      = "ReadOnly"
)

func builtinRoles() map[string]map[Privilege]bool {
	set := func(ps ...[]Privilege) map[Privilege]bool {
		m := map[Privilege]bool{}
		for _, l := range ps {
			for _, p := range l {
				m[p] = true
			}
		}
		return m
	}
	return map[string]map[Privilege]bool{
		RoleAdministrator: set(cryptoPrivs, plainPrivs),
		RoleNoCryptoAdmin: set(plainPrivs),
		RoleReadOnly:      set([]Privilege{PrivRead}),
	}
}

// authorizer maps a peer uid to a role.
type authorizer struct {
	roles    map[string]map[Privilege]bool
	mu       sync.RWMutex // guards bindings, which a reload replaces
	bindings []config.RoleBinding
	// lookup resolves uid -> user name and group names; replaceable in tests.
	lookup func(uid int) (name string, groups []string, err error)
}

func newAuthorizer(bindings []config.RoleBinding) (*authorizer, error) {
	a := &authorizer{roles: builtinRoles(), bindings: bindings, lookup: lookupUser}
	for _, b := range bindings {
		if _, ok := a.roles[b.Role]; !ok {
			return nil, fmt.Errorf("roles: unknown role %q (built-in: %s, %s, %s)", b.Role, RoleAdministrator, RoleNoCryptoAdmin, RoleReadOnly)
		}
	}
	return a, nil
}

func lookupUser(uid int) (string, []string, error) {
	u, err := user.LookupId(strconv.Itoa(uid))
	if err != nil {
		return "", nil, err
	}
	gids, err := u.GroupIds()
	if err != nil {
		return u.Username, nil, nil
	}
	var groups []string
	for _, g := range gids {
		if gr, err := user.LookupGroupId(g); err == nil {
			groups = append(groups, gr.Name)
		}
	}
	return u.Username, groups, nil
}

// identity is a resolved caller.
type identity struct {
	UID  int
	User string
	Role string // "" when the caller has no role
}

// resolve finds the caller's role: root is always Administrator (as on
// ESXi); otherwise the first binding that matches uid, user name or one of
// the user's groups, in config order.
func (a *authorizer) resolve(uid int) identity {
	id := identity{UID: uid, User: strconv.Itoa(uid)}
	name, groups, err := a.lookup(uid)
	if err == nil && name != "" {
		id.User = name
	}
	if uid == 0 {
		id.Role = RoleAdministrator
		return id
	}
	a.mu.RLock()
	bindings := a.bindings
	a.mu.RUnlock()
	for _, b := range bindings {
		switch {
		case b.UID != nil && *b.UID == uid,
			b.User != "" && b.User == name,
			b.Group != "" && contains(groups, b.Group):
			id.Role = b.Role
			return id
		}
	}
	return id
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

func (a *authorizer) allowed(id identity, p Privilege) bool {
	return a.roles[id.Role][p]
}

func (a *authorizer) privileges(role string) []string {
	var out []string
	for p := range a.roles[role] {
		out = append(out, string(p))
	}
	sort.Strings(out)
	return out
}

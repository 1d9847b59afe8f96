package manager

import (
	"os/user"
	"slices"
	"strconv"

	"github.com/vmcryptd/vmcryptd/internal/config"
)

// Privileges on the admin socket, named as the daemon's (and vSphere's).
const (
	PrivRead         = "System.Read"                // status, host list
	PrivRegisterHost = "Cryptographer.RegisterHost" // host add / remove
	PrivManageKeys   = "Cryptographer.ManageKeys"   // host lock / unlock
	// PrivManagePolicy is vSphere's privilege for encryption storage
	// policies: policy create / remove.
	PrivManagePolicy = "Cryptographer.ManageEncryptionPolicy"
	privHostKey      = "Cryptographer.Access"     // host channel: get_key
	privHostCreate   = "Cryptographer.EncryptNew" // host channel: create_key
	privHostRegister = "Cryptographer.RegisterVM" // host channel: (un)register_vm
	privHostHello    = "Host.Config.Connection"   // host channel: hello
	privHostPolicy   = "StorageProfile.View"      // host channel: list_policies, get_policy
)

// rolePrivileges are the daemon's built-in roles as the manager's admin
// socket knows them.
var rolePrivileges = map[string][]string{
	"Administrator": {PrivRead, PrivRegisterHost, PrivManageKeys, PrivManagePolicy},
	"NoCryptoAdmin": {PrivRead},
	"ReadOnly":      {PrivRead},
}

// roleOf resolves a caller: root is always Administrator; otherwise the
// first binding matching uid, user name or one of its groups.
func roleOf(bindings []config.RoleBinding, uid int, lookup func(int) (string, []string)) string {
	if uid == 0 {
		return "Administrator"
	}
	name, groups := lookup(uid)
	for _, b := range bindings {
		if (b.UID != nil && *b.UID == uid) || (b.User != "" && b.User == name) || (b.Group != "" && slices.Contains(groups, b.Group)) {
			return b.Role
		}
	}
	return ""
}

// roleAllows is the admin socket's one authorisation decision.
func roleAllows(role, priv string) bool { return slices.Contains(rolePrivileges[role], priv) }

func lookupUser(uid int) (string, []string) {
	u, err := user.LookupId(strconv.Itoa(uid))
	if err != nil {
		return "", nil
	}
	var groups []string
	if gids, err := u.GroupIds(); err == nil {
		for _, g := range gids {
			if gr, err := user.LookupGroupId(g); err == nil {
				groups = append(groups, gr.Name)
			}
		}
	}
	return u.Username, groups
}

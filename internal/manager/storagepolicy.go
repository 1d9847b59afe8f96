package manager

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

// Storage policies, as vCenter holds VM storage policies: a VM's policy
// says whether it is encrypted and under which key provider. The two
// built-ins always exist; the others live in the inventory. The
// decisions below are pure functions of the inventory and the request,
// table-tested in storagepolicy_test.go.

// policyRec is a storage policy made with `manager policy create`.
type policyRec struct {
	Name     string `json:"name"`
	Encrypts bool   `json:"encrypts"`
	// Provider is the key provider of an encrypting policy; "" means the
	// manager's default provider at the time a VM is put under it.
	Provider    string    `json:"provider,omitempty"`
	Description string    `json:"description,omitempty"`
	Created     time.Time `json:"created"`
	CreatedBy   string    `json:"created_by,omitempty"`
}

// builtinPolicies are the two policies every manager has.
var builtinPolicies = []policyRec{
	{Name: mgrproto.PolicyEncrypt, Encrypts: true, Description: "VM files and disks encrypted at rest under a KEK of the manager's default provider"},
	{Name: mgrproto.PolicyDefault, Encrypts: false, Description: "no encryption"},
}

func builtinPolicy(name string) (policyRec, bool) {
	for _, p := range builtinPolicies {
		if p.Name == name {
			return p, true
		}
	}
	return policyRec{}, false
}

// lookupPolicy finds a policy by its exact name: a built-in or one of
// the inventory's.
func lookupPolicy(inv *inventory, name string) (policyRec, bool) {
	if p, ok := builtinPolicy(name); ok {
		return p, true
	}
	if p, ok := inv.Policies[name]; ok {
		return *p, true
	}
	return policyRec{}, false
}

// allPolicies lists the built-ins, then the others by name.
func allPolicies(inv *inventory) []policyRec {
	out := slices.Clone(builtinPolicies)
	var names []string
	for n := range inv.Policies {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		out = append(out, *inv.Policies[n])
	}
	return out
}

// PolicyCreateRequest is POST /v1/policies.
type PolicyCreateRequest struct {
	Name string `json:"name"`
	// Encrypt makes an encryption policy; without it the policy stores
	// VMs plain (as Datastore Default does).
	Encrypt bool `json:"encrypt,omitempty"`
	// Provider (encrypting policies only): the key provider its VMs' KEKs
	// are made on; empty: the manager's default provider.
	Provider    string `json:"provider,omitempty"`
	Description string `json:"description,omitempty"`
}

// checkPolicyName judges a policy name: 1 to MaxPolicyName bytes of
// UTF-8, printable, no '/' (it is a path element of the admin API), no
// leading or trailing space.
func checkPolicyName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("a policy needs a name")
	case len(name) > mgrproto.MaxPolicyName:
		return fmt.Errorf("policy name %.40q...: longer than %d bytes", name, mgrproto.MaxPolicyName)
	case !utf8.ValidString(name):
		return fmt.Errorf("policy name %q is not UTF-8", name)
	case strings.TrimSpace(name) != name:
		return fmt.Errorf("policy name %q starts or ends with white space", name)
	case strings.ContainsRune(name, '/'):
		return fmt.Errorf("policy name %q contains '/'", name)
	}
	for _, r := range name {
		if !unicode.IsPrint(r) {
			return fmt.Errorf("policy name %q contains an unprintable character", name)
		}
	}
	return nil
}

// mayCreatePolicy decides a `manager policy create`: a valid name used
// by no policy (compared case-insensitively, so "gold" and "Gold" cannot
// both exist), a provider only for an encrypting policy and one the
// manager has, a short printable description, and room for it.
func mayCreatePolicy(inv *inventory, req PolicyCreateRequest, providers []string) error {
	if err := checkPolicyName(req.Name); err != nil {
		return err
	}
	for _, p := range allPolicies(inv) {
		if strings.EqualFold(p.Name, req.Name) {
			if _, bi := builtinPolicy(p.Name); bi {
				return errPolicyExists{fmt.Sprintf("policy %q is built in", p.Name)}
			}
			return errPolicyExists{fmt.Sprintf("policy %q already exists", p.Name)}
		}
	}
	if req.Provider != "" && !req.Encrypt {
		return fmt.Errorf("policy %q: a key provider is only for an encryption policy (add --encrypt)", req.Name)
	}
	if req.Provider != "" && !slices.Contains(providers, req.Provider) {
		return fmt.Errorf("policy %q: key provider %q is not configured on the manager (it has %s)", req.Name, req.Provider, strings.Join(providers, ", "))
	}
	if len(req.Description) > mgrproto.MaxPolicyDescription || !utf8.ValidString(req.Description) || strings.ContainsFunc(req.Description, func(r rune) bool { return !unicode.IsPrint(r) }) {
		return fmt.Errorf("policy %q: the description must be printable UTF-8 of at most %d bytes", req.Name, mgrproto.MaxPolicyDescription)
	}
	if len(builtinPolicies)+len(inv.Policies) >= mgrproto.MaxPolicies {
		return fmt.Errorf("policy %q: the manager already holds %d policies, the most it keeps", req.Name, mgrproto.MaxPolicies)
	}
	if n := listReplySize(append(allPolicies(inv), policyRec{Name: req.Name, Encrypts: req.Encrypt, Description: req.Description}), providers); n > mgrproto.MaxFrame {
		return fmt.Errorf("policy %q: the list of policies would no longer fit in one host-channel frame (%d bytes, at most %d): shorten descriptions", req.Name, n, mgrproto.MaxFrame)
	}
	return nil
}

// listReplySize bounds the size of the list_policies reply for pols: each
// encrypting policy counted with the longest provider name.
func listReplySize(pols []policyRec, providers []string) int {
	longest := ""
	for _, p := range providers {
		if len(p) > len(longest) {
			longest = p
		}
	}
	r := mgrproto.Reply{OK: true}
	for _, p := range pols {
		mp := mgrproto.Policy{Name: p.Name, Encrypts: p.Encrypts, Builtin: true, Description: p.Description}
		if p.Encrypts {
			mp.Provider = longest
		}
		r.Policies = append(r.Policies, mp)
	}
	b, err := json.Marshal(r)
	if err != nil {
		return math.MaxInt
	}
	return len(b)
}

// errPolicyExists marks a create whose name is taken.
type errPolicyExists struct{ msg string }

func (e errPolicyExists) Error() string { return e.msg }

// errPolicyNotFound marks a name no policy has.
type errPolicyNotFound struct{ name string }

func (e errPolicyNotFound) Error() string {
	return fmt.Sprintf("no storage policy %q on the manager ('vmcryptd manager policy list' lists them)", e.name)
}

// mayRemovePolicy decides a `manager policy remove`: not a built-in, and
// no VM of the inventory under it (the refusal names one).
func mayRemovePolicy(inv *inventory, name string) error {
	if _, ok := builtinPolicy(name); ok {
		return fmt.Errorf("policy %q is built in and cannot be removed", name)
	}
	if _, ok := inv.Policies[name]; !ok {
		return errPolicyNotFound{name}
	}
	var users []*vmRec
	for _, vm := range inv.VMs {
		if vm.Policy == name {
			users = append(users, vm)
		}
	}
	if len(users) == 0 {
		return nil
	}
	sort.Slice(users, func(i, j int) bool { return users[i].ID < users[j].ID })
	vm := users[0]
	what := "VM " + vm.ID
	if vm.Name != "" {
		what = fmt.Sprintf("VM %s (%s)", vm.Name, vm.ID)
	}
	more, them := "", "it"
	if len(users) > 1 {
		more, them = fmt.Sprintf(" and %d other VM(s)", len(users)-1), "them"
	}
	return fmt.Errorf("policy %q is in use by %s on host %q%s: set another policy on %s first", name, what, vm.Host, more, them)
}

// resolvePolicy is what a policy means for a VM put under it now: for an
// encrypting policy, the provider its KEK is made on (the policy's own,
// or the manager's default), which must be configured.
func resolvePolicy(inv *inventory, name, defaultProvider string, providers []string) (mgrproto.Policy, error) {
	p, ok := lookupPolicy(inv, name)
	if !ok {
		return mgrproto.Policy{}, errPolicyNotFound{name}
	}
	_, builtin := builtinPolicy(name)
	out := mgrproto.Policy{Name: p.Name, Encrypts: p.Encrypts, Builtin: builtin, Description: p.Description}
	if !p.Encrypts {
		return out, nil
	}
	out.Provider = p.Provider
	if out.Provider == "" {
		out.Provider = defaultProvider
	}
	if out.Provider == "" || !slices.Contains(providers, out.Provider) {
		return mgrproto.Policy{}, fmt.Errorf("policy %q encrypts under key provider %q, which is not configured on the manager (it has %s)", name, out.Provider, strings.Join(providers, ", "))
	}
	return out, nil
}

// mayRegisterPolicy decides the policy a register_vm names: none (the
// recorded one is kept), or an existing policy that encrypts (a
// registered VM is an encrypted one).
func mayRegisterPolicy(inv *inventory, vm mgrproto.VM) error {
	if vm.Policy == "" {
		return nil
	}
	p, ok := lookupPolicy(inv, vm.Policy)
	switch {
	case !ok:
		return fmt.Errorf("VM %s: %v", vm.ID, errPolicyNotFound{vm.Policy})
	case !p.Encrypts:
		return fmt.Errorf("VM %s: policy %q does not encrypt, but only encrypted VMs are registered", vm.ID, vm.Policy)
	}
	return nil
}

// registeredPolicy is the policy recorded for a VM registration: the one
// the host names, else the one already recorded for the VM, else the
// built-in encryption policy (the VM was encrypted without a policy).
func registeredPolicy(cur *vmRec, named string) string {
	switch {
	case named != "":
		return named
	case cur != nil && cur.Policy != "":
		return cur.Policy
	}
	return mgrproto.PolicyEncrypt
}

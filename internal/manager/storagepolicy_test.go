package manager

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/internal/config"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

func storagePolicyInventory() *inventory {
	inv := policyInventory()
	inv.Policies["Gold"] = &policyRec{Name: "Gold", Encrypts: true, Provider: "kms2"}
	inv.Policies["Silver"] = &policyRec{Name: "Silver", Encrypts: true}
	inv.Policies["Plain"] = &policyRec{Name: "Plain"}
	inv.Policies["Orphaned"] = &policyRec{Name: "Orphaned", Encrypts: true, Provider: "gone"}
	inv.VMs["vm1"].Policy = "Gold"
	inv.VMs["vm1"].Name = "web"
	inv.VMs["vm3"] = &vmRec{ID: "vm3", Host: "host2", Keys: inv.VMs["vm2"].Keys, Policy: "Gold"}
	return inv
}

func TestMayCreatePolicy(t *testing.T) {
	inv := storagePolicyInventory()
	provs := []string{"kms", "kms2"}
	full := newInventory()
	for i := 0; i < mgrproto.MaxPolicies-len(builtinPolicies); i++ {
		n := "p" + string(rune('A'+i%26)) + strings.Repeat("x", i/26)
		full.Policies[n] = &policyRec{Name: n}
	}
	// Descriptions JSON escapes six-fold: fewer than MaxPolicies of them
	// fill a frame.
	escaped := newInventory()
	for i := 0; i < 160; i++ {
		n := "e" + string(rune('A'+i%26)) + strings.Repeat("x", i/26) + strings.Repeat("&", 60)
		escaped.Policies[n] = &policyRec{Name: n, Encrypts: true, Description: strings.Repeat("<", mgrproto.MaxPolicyDescription)}
	}
	if n := listReplySize(allPolicies(escaped), provs); n <= mgrproto.MaxFrame {
		t.Fatalf("escaped inventory: %d bytes, the test wants more than a frame", n)
	}
	for _, c := range []struct {
		name string
		inv  *inventory
		req  PolicyCreateRequest
		want string
	}{
		{"encrypting", inv, PolicyCreateRequest{Name: "Bronze", Encrypt: true}, ""},
		{"encrypting with provider", inv, PolicyCreateRequest{Name: "Bronze", Encrypt: true, Provider: "kms2"}, ""},
		{"plain", inv, PolicyCreateRequest{Name: "Cheap"}, ""},
		{"spaces inside", inv, PolicyCreateRequest{Name: "Tier 1 (encrypted)", Encrypt: true, Description: "for PCI VMs"}, ""},
		{"provider without encrypt", inv, PolicyCreateRequest{Name: "Bronze", Provider: "kms"}, "only for an encryption policy"},
		{"unknown provider", inv, PolicyCreateRequest{Name: "Bronze", Encrypt: true, Provider: "nope"}, `"nope" is not configured on the manager (it has kms, kms2)`},
		{"exists", inv, PolicyCreateRequest{Name: "Gold", Encrypt: true}, `"Gold" already exists`},
		{"exists other case", inv, PolicyCreateRequest{Name: "gold"}, `"Gold" already exists`},
		{"built-in", inv, PolicyCreateRequest{Name: mgrproto.PolicyDefault}, "is built in"},
		{"built-in other case", inv, PolicyCreateRequest{Name: "vm encryption policy", Encrypt: true}, "is built in"},
		{"empty", inv, PolicyCreateRequest{}, "needs a name"},
		{"slash", inv, PolicyCreateRequest{Name: "a/b"}, "contains '/'"},
		{"leading space", inv, PolicyCreateRequest{Name: " Gold2"}, "white space"},
		{"control", inv, PolicyCreateRequest{Name: "Go\nld"}, "unprintable"},
		{"not utf-8", inv, PolicyCreateRequest{Name: "G\xffold"}, "not UTF-8"},
		{"long", inv, PolicyCreateRequest{Name: strings.Repeat("g", mgrproto.MaxPolicyName+1)}, "longer than 80"},
		{"long description", inv, PolicyCreateRequest{Name: "Bronze", Description: strings.Repeat("d", mgrproto.MaxPolicyDescription+1)}, "description"},
		{"full", full, PolicyCreateRequest{Name: "One more"}, "already holds 256 policies"},
		{"list too big", escaped, PolicyCreateRequest{Name: "One more", Encrypt: true, Description: strings.Repeat("<", mgrproto.MaxPolicyDescription)}, "would no longer fit in one host-channel frame"},
	} {
		check(t, c.name, mayCreatePolicy(c.inv, c.req, provs), c.want)
	}
	var ex errPolicyExists
	if err := mayCreatePolicy(inv, PolicyCreateRequest{Name: "Gold"}, provs); !errors.As(err, &ex) {
		t.Errorf("exists: %T, want errPolicyExists", err)
	}
}

func TestMayRemovePolicy(t *testing.T) {
	inv := storagePolicyInventory()
	for _, c := range []struct{ name, want string }{
		{"Silver", ""},
		{"Plain", ""},
		{"Gold", `policy "Gold" is in use by VM web (vm1) on host "host1" and 1 other VM(s)`},
		{mgrproto.PolicyEncrypt, "built in and cannot be removed"},
		{mgrproto.PolicyDefault, "built in and cannot be removed"},
		{"gold", `no storage policy "gold"`},
		{"Nope", `no storage policy "Nope"`},
	} {
		check(t, c.name, mayRemovePolicy(inv, c.name), c.want)
	}
	// A VM unregistered (or decrypted) no longer holds its policy.
	delete(inv.VMs, "vm1")
	check(t, "Gold after vm1 left", mayRemovePolicy(inv, "Gold"), `in use by VM vm3 on host "host2"`)
	delete(inv.VMs, "vm3")
	check(t, "Gold unused", mayRemovePolicy(inv, "Gold"), "")
}

func TestResolvePolicy(t *testing.T) {
	inv := storagePolicyInventory()
	provs := []string{"kms", "kms2"}
	for _, c := range []struct {
		name     string
		def      string
		encrypts bool
		provider string
		want     string
	}{
		{mgrproto.PolicyEncrypt, "kms", true, "kms", ""},
		{mgrproto.PolicyEncrypt, "kms2", true, "kms2", ""},
		{mgrproto.PolicyDefault, "kms", false, "", ""},
		{"Gold", "kms", true, "kms2", ""},
		{"Silver", "kms", true, "kms", ""},
		{"Plain", "kms", false, "", ""},
		{"Orphaned", "kms", false, "", `provider "gone", which is not configured`},
		{mgrproto.PolicyEncrypt, "", false, "", "not configured"},
		{"Nope", "kms", false, "", `no storage policy "Nope"`},
	} {
		got, err := resolvePolicy(inv, c.name, c.def, provs)
		check(t, c.name, err, c.want)
		if err == nil && (got.Name != c.name || got.Encrypts != c.encrypts || got.Provider != c.provider) {
			t.Errorf("%s (default %s): %+v, want encrypts %v provider %q", c.name, c.def, got, c.encrypts, c.provider)
		}
	}
}

func TestRegisteredPolicy(t *testing.T) {
	inv := storagePolicyInventory()
	for _, c := range []struct {
		cur         *vmRec
		named, want string
	}{
		{nil, "", mgrproto.PolicyEncrypt},
		{nil, "Gold", "Gold"},
		{inv.VMs["vm1"], "", "Gold"},
		{inv.VMs["vm1"], "Silver", "Silver"},
		{inv.VMs["vm2"], "", mgrproto.PolicyEncrypt}, // recorded before policies
	} {
		if got := registeredPolicy(c.cur, c.named); got != c.want {
			t.Errorf("registeredPolicy(%v, %q) = %q, want %q", c.cur, c.named, got, c.want)
		}
	}
	for _, c := range []struct{ policy, want string }{
		{"", ""},
		{"Gold", ""},
		{mgrproto.PolicyEncrypt, ""},
		{"Plain", "does not encrypt"},
		{mgrproto.PolicyDefault, "does not encrypt"},
		{"Nope", `no storage policy "Nope"`},
	} {
		check(t, "register under "+c.policy, mayRegisterPolicy(inv, mgrproto.VM{ID: "vm9", Policy: c.policy}), c.want)
	}
}

// TestStoragePoliciesLab: policies made on the admin socket reach hosts
// over the host channel, a registration records its VM's policy, a used
// policy cannot be removed, and all of it survives a manager restart.
func TestStoragePoliciesLab(t *testing.T) {
	l := startLab(t)
	ctx := context.Background()
	h1, _ := l.addHost("host1")
	adm := l.admin()

	var gold PolicyInfo
	if err := adm.Do(ctx, "POST", "/policies", PolicyCreateRequest{Name: "Gold", Encrypt: true, Provider: "lab", Description: "PCI"}, &gold); err != nil {
		t.Fatal(err)
	}
	if gold.Name != "Gold" || !gold.Encrypts || gold.ResolvedProvider != "lab" || gold.Builtin {
		t.Fatalf("create Gold: %+v", gold)
	}
	if err := adm.Do(ctx, "POST", "/policies", PolicyCreateRequest{Name: "Plain"}, nil); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		req  PolicyCreateRequest
		want string
	}{
		{PolicyCreateRequest{Name: "gold"}, "already exists"},
		{PolicyCreateRequest{Name: "Bad", Encrypt: true, Provider: "nope"}, "not configured"},
		{PolicyCreateRequest{Name: mgrproto.PolicyDefault}, "built in"},
	} {
		err := adm.Do(ctx, "POST", "/policies", c.req, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("create %+v: %v, want %q", c.req, err, c.want)
		}
	}

	pols, err := h1.ListPolicies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range pols {
		names = append(names, p.Name)
	}
	if strings.Join(names, ",") != mgrproto.PolicyEncrypt+","+mgrproto.PolicyDefault+",Gold,Plain" {
		t.Fatalf("host list_policies: %v", names)
	}
	got, err := h1.GetPolicy(ctx, "Gold")
	if err != nil || !got.Encrypts || got.Provider != "lab" {
		t.Fatalf("get_policy Gold: %+v %v", got, err)
	}
	if got, err := h1.GetPolicy(ctx, mgrproto.PolicyEncrypt); err != nil || got.Provider != "lab" || !got.Builtin {
		t.Fatalf("get_policy built-in: %+v %v", got, err)
	}
	_, err = h1.GetPolicy(ctx, "Nope")
	refusal(t, err, mgrproto.CodeNotFound, `no storage policy "Nope"`)

	k, err := h1.CreateKey(ctx, "lab", "vm1")
	if err != nil {
		t.Fatal(err)
	}
	refusal(t, h1.RegisterVM(ctx, mgrproto.VM{ID: "vm-1", Keys: []mgrproto.KeyRef{k}, Policy: "Plain"}), mgrproto.CodeDenied, "does not encrypt")
	if err := h1.RegisterVM(ctx, mgrproto.VM{ID: "vm-1", Name: "web", Keys: []mgrproto.KeyRef{k}, Policy: "Gold"}); err != nil {
		t.Fatal(err)
	}
	// A re-registration without a policy (the key loop after a host
	// restart) keeps the recorded one.
	if err := h1.RegisterVM(ctx, mgrproto.VM{ID: "vm-1", Name: "web", Keys: []mgrproto.KeyRef{k}}); err != nil {
		t.Fatal(err)
	}
	err = adm.Do(ctx, "DELETE", "/policies/Gold", nil, nil)
	if err == nil || !strings.Contains(err.Error(), `in use by VM web (vm-1) on host "host1"`) {
		t.Fatalf("remove a used policy: %v", err)
	}
	err = adm.Do(ctx, "DELETE", "/policies/"+url.PathEscape(mgrproto.PolicyDefault), nil, nil)
	if err == nil || !strings.Contains(err.Error(), "built in") {
		t.Fatalf("remove a built-in: %v", err)
	}

	l.stop()
	l.start()
	var st Status
	if err := adm.Do(ctx, "GET", "/status", nil, &st); err != nil {
		t.Fatal(err)
	}
	if len(st.VMs) != 1 || st.VMs[0].Policy != "Gold" {
		t.Fatalf("after restart, VMs %+v", st.VMs)
	}
	byName := map[string]PolicyInfo{}
	for _, p := range st.Policies {
		byName[p.Name] = p
	}
	if byName["Gold"].VMs != 1 || byName["Gold"].Description != "PCI" || byName["Plain"].Encrypts || !byName[mgrproto.PolicyDefault].Builtin || len(byName) != 4 {
		t.Fatalf("after restart, policies %+v", st.Policies)
	}
	if err := adm.Do(ctx, "DELETE", "/policies/Plain", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := h1.UnregisterVM(ctx, "vm-1"); err != nil {
		t.Fatal(err)
	}
	if err := adm.Do(ctx, "DELETE", "/policies/Gold", nil, nil); err != nil {
		t.Fatalf("remove Gold once unused: %v", err)
	}
	var after []PolicyInfo
	if err := adm.Do(ctx, "GET", "/policies", nil, &after); err != nil || len(after) != 2 {
		t.Fatalf("policies after removals: %+v %v", after, err)
	}
	inv, err := os.ReadFile(filepath.Join(l.cfg.StateDir, "inventory.json"))
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(inv, &raw); err != nil {
		t.Fatal(err)
	}
	if _, ok := raw["policies"]; ok {
		t.Errorf("inventory still lists policies: %s", raw["policies"])
	}

	audit, err := os.ReadFile(l.cfg.AuditLog)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`"op":"manager.policy.create","privilege":"Cryptographer.ManageEncryptionPolicy","result":"ok","detail":"policy \"Gold\" created: encrypts under provider lab"`,
		`"op":"manager.policy.create","privilege":"Cryptographer.ManageEncryptionPolicy","result":"denied"`,
		`"op":"manager.policy.remove","privilege":"Cryptographer.ManageEncryptionPolicy","result":"denied","detail":"policy \"Gold\": policy \"Gold\" is in use`,
		`"op":"manager.policy.remove","privilege":"Cryptographer.ManageEncryptionPolicy","result":"ok","detail":"policy \"Gold\" removed"`,
		`"host":"host1","op":"host.get_policy","privilege":"StorageProfile.View","result":"ok","detail":"policy \"Gold\": encrypts under provider lab"`,
		`"host":"host1","op":"host.get_policy","privilege":"StorageProfile.View","result":"denied"`,
		`"host":"host1","op":"host.register_vm","vm":"vm-1"`,
	} {
		if !strings.Contains(string(audit), want) {
			t.Errorf("audit log lacks %s", want)
		}
	}
}

// TestPolicyAdminRoles: a caller without Cryptographer.ManageEncryptionPolicy
// may list policies but not create or remove them, and the refusal is
// audited.
func TestPolicyAdminRoles(t *testing.T) {
	l := startLab(t)
	ctx := context.Background()
	// uid 1000 is bound to NoCryptoAdmin. The socket is 0660 root: the
	// checks run through the router with the peer uid set as SO_PEERCRED
	// would, instead of as a second user.
	l.stop()
	uid := 1000
	l.cfg.Roles = []config.RoleBinding{{UID: &uid, Role: "NoCryptoAdmin"}}
	l.start()
	h := l.m.adminRoutes()
	for _, c := range []struct {
		method, path, body string
		code               int
	}{
		{"GET", "/v1/policies", "", 200},
		{"POST", "/v1/policies", `{"name":"Gold","encrypt":true}`, 403},
		{"DELETE", "/v1/policies/Gold", "", 403},
	} {
		code, body := serveAs(t, h, 1000, c.method, c.path, c.body)
		if code != c.code {
			t.Errorf("%s %s as uid 1000: %d %s, want %d", c.method, c.path, code, body, c.code)
		}
		if c.code == 403 && !strings.Contains(body, `"missing_privilege":"Cryptographer.ManageEncryptionPolicy"`) {
			t.Errorf("%s %s: %s", c.method, c.path, body)
		}
	}
	var pols []PolicyInfo
	if err := l.admin().Do(ctx, "GET", "/policies", nil, &pols); err != nil || len(pols) != 2 {
		t.Fatalf("policies: %+v %v", pols, err)
	}
	audit, _ := os.ReadFile(l.cfg.AuditLog)
	if !strings.Contains(string(audit), `"uid":1000,"op":"POST /v1/policies","privilege":"Cryptographer.ManageEncryptionPolicy","result":"denied"`) {
		t.Errorf("audit log lacks the role denial:\n%s", audit)
	}
}

// serveAs runs one admin request through h as if uid had sent it on the
// socket (the uid SO_PEERCRED would report).
func serveAs(t *testing.T, h http.Handler, uid int, method, path, body string) (int, string) {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	req = req.WithContext(context.WithValue(req.Context(), peerKey{}, uid))
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w.Code, w.Body.String()
}

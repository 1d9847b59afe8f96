package daemon

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

func TestPolicyNamesMatchEngine(t *testing.T) {
	if mgrproto.PolicyEncrypt != vm.PolicyEncrypt || mgrproto.PolicyDefault != vm.PolicyDefault {
		t.Fatalf("built-in policy names differ: mgrproto %q/%q, engine %q/%q", mgrproto.PolicyEncrypt, mgrproto.PolicyDefault, vm.PolicyEncrypt, vm.PolicyDefault)
	}
}

func TestPlanPolicy(t *testing.T) {
	gold := mgrproto.Policy{Name: "Gold", Encrypts: true, Provider: "kms2"}
	plain := mgrproto.Policy{Name: "Datastore Default"}
	for _, c := range []struct {
		name        string
		pol         mgrproto.Policy
		encrypted   bool
		interrupted string
		provs       []string
		want        policyStep
		priv        Privilege
	}{
		{"plain VM, encrypting policy", gold, false, "", nil, stepEncrypt, PrivEncrypt},
		{"encrypted under the policy's provider", gold, true, "", []string{"kms2", "kms2"}, stepNone, ""},
		{"encrypted under another provider", gold, true, "", []string{"kms"}, stepRekey, PrivRecrypt},
		{"mixed providers", gold, true, "", []string{"kms2", "kms"}, stepRekey, PrivRecrypt},
		{"interrupted encrypt resumes", gold, false, "encrypt", nil, stepEncrypt, PrivEncrypt},
		{"interrupted, counted encrypted", gold, true, "encrypt", []string{"kms2"}, stepEncrypt, PrivEncrypt},
		{"encrypted VM, plain policy", plain, true, "", []string{"kms"}, stepDecrypt, PrivDecrypt},
		{"plain VM, plain policy", plain, false, "", nil, stepNone, ""},
		{"interrupted decrypt, plain policy", plain, false, "decrypt", nil, stepDecrypt, PrivDecrypt},
	} {
		got := planPolicy(c.pol, c.encrypted, c.interrupted, c.provs)
		if got != c.want || policyStepPrivilege(got) != c.priv {
			t.Errorf("%s: %s (needs %q), want %s (needs %q)", c.name, got, policyStepPrivilege(got), c.want, c.priv)
		}
	}
}

func TestManagerPolicyError(t *testing.T) {
	for _, c := range []struct {
		err  error
		code int
		want string
	}{
		{&mgrproto.UnreachableError{Addr: "127.0.0.1:1", Err: errors.New("connection refused")}, http.StatusServiceUnavailable, "manager unreachable at 127.0.0.1:1: connection refused (nothing was changed)"},
		{&mgrproto.RefusedError{Code: mgrproto.CodeNotFound, Msg: `no storage policy "X"`}, http.StatusBadRequest, `no storage policy "X"`},
		{&mgrproto.RefusedError{Code: mgrproto.CodeRevoked, Msg: "revoked"}, http.StatusForbidden, "revoked"},
	} {
		err := managerPolicyError("policy", c.err, " (nothing was changed)")
		var he *httpError
		if !errors.As(err, &he) || he.code != c.code || !strings.Contains(he.msg, c.want) {
			t.Errorf("%v: %v, want %d %q", c.err, err, c.code, c.want)
		}
	}
}

package labkms

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/kmipclient"
	"github.com/ovh/kmip-go/payloads"

	"github.com/vmcryptd/vmcryptd/internal/pki"
)

func quiet() *slog.Logger {
	if os.Getenv("KMS_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func initDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "lab")
	if err := Init(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

// start runs a lab KMS on a free loopback port until the test ends.
func start(t *testing.T, dir string) *Server {
	t.Helper()
	s, err := Listen(dir, "127.0.0.1:0", quiet())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return s
}

func dial(t *testing.T, s *Server, versions ...kmip.ProtocolVersion) *kmipclient.Client {
	t.Helper()
	p := s.Paths()
	opts := []kmipclient.Option{kmipclient.WithRootCAFile(p.CACert), kmipclient.WithClientCertFiles(p.ClientCert, p.ClientKey)}
	if len(versions) > 0 {
		opts = append(opts, kmipclient.WithKmipVersions(versions...))
	}
	c, err := kmipclient.Dial(s.Addr(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// do sends one operation and returns its payload and result reason (0 on
// success), failing the test on transport errors only.
func do(t *testing.T, c *kmipclient.Client, req kmip.OperationPayload) (kmip.OperationPayload, kmip.ResultReason) {
	t.Helper()
	res, err := c.Batch(ctx(t), req)
	if err != nil {
		t.Fatalf("%T: %v", req, err)
	}
	bi := res[0]
	if bi.ResultStatus != kmip.ResultStatusSuccess {
		return nil, bi.ResultReason
	}
	return bi.ResponsePayload, 0
}

func mustDo[R kmip.OperationPayload](t *testing.T, c *kmipclient.Client, req kmip.OperationPayload) R {
	t.Helper()
	resp, reason := do(t, c, req)
	if reason != 0 {
		t.Fatalf("%T failed: %v", req, reason)
	}
	return resp.(R)
}

func createAES(t *testing.T, c *kmipclient.Client, bits int32, attrs ...kmip.Attribute) string {
	t.Helper()
	resp := mustDo[*payloads.CreateResponsePayload](t, c, &payloads.CreateRequestPayload{
		ObjectType: kmip.ObjectTypeSymmetricKey,
		TemplateAttribute: kmip.TemplateAttribute{Attribute: append([]kmip.Attribute{
			{AttributeName: kmip.AttributeNameCryptographicAlgorithm, AttributeValue: kmip.CryptographicAlgorithmAES},
			{AttributeName: kmip.AttributeNameCryptographicLength, AttributeValue: bits},
			{AttributeName: kmip.AttributeNameCryptographicUsageMask, AttributeValue: kmip.CryptographicUsageEncrypt | kmip.CryptographicUsageDecrypt},
		}, attrs...)},
	})
	return resp.UniqueIdentifier
}

func getKey(t *testing.T, c *kmipclient.Client, id string) ([]byte, kmip.ResultReason) {
	t.Helper()
	resp, reason := do(t, c, &payloads.GetRequestPayload{UniqueIdentifier: id})
	if reason != 0 {
		return nil, reason
	}
	k, err := resp.(*payloads.GetResponsePayload).SymmetricKey()
	if err != nil {
		t.Fatal(err)
	}
	return k, 0
}

func state(t *testing.T, c *kmipclient.Client, id string) kmip.State {
	t.Helper()
	resp := mustDo[*payloads.GetAttributesResponsePayload](t, c, &payloads.GetAttributesRequestPayload{
		UniqueIdentifier: id, AttributeName: []kmip.AttributeName{kmip.AttributeNameState},
	})
	if len(resp.Attribute) != 1 {
		t.Fatalf("State attribute: %+v", resp.Attribute)
	}
	return resp.Attribute[0].AttributeValue.(kmip.State)
}

func TestInit(t *testing.T) {
	dir := initDir(t)
	p := PathsFor(dir)

	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode: %v %v", fi.Mode(), err)
	}
	for path, mode := range map[string]os.FileMode{
		p.CACert: 0o644, p.CAKey: 0o600, p.ServerCert: 0o644, p.ServerKey: 0o600,
		p.ClientCert: 0o644, p.ClientKey: 0o600, p.MasterKey: 0o600,
	} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, want %v", path, fi.Mode().Perm(), mode)
		}
	}
	if mk, _ := os.ReadFile(p.MasterKey); len(mk) != MasterKeySize {
		t.Fatalf("master key is %d bytes", len(mk))
	}

	ca, err := pki.Load(p.CACert, p.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := pki.Load(p.ServerCert, p.ServerKey)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := pki.Load(p.ClientCert, p.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	for _, pair := range []*pki.Pair{ca, srv, cli} {
		if k, ok := pair.Key.(*ecdsa.PrivateKey); !ok || k.Curve != elliptic.P256() {
			t.Fatalf("%s: not P-256", pair.Cert.Subject)
		}
		if _, ok := pair.Cert.PublicKey.(*ecdsa.PublicKey); !ok {
			t.Fatalf("%s: not ECDSA", pair.Cert.Subject)
		}
	}
	if !ca.Cert.IsCA {
		t.Fatal("CA certificate is not a CA")
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	for _, host := range []string{"127.0.0.1", "::1", "localhost"} {
		if _, err := srv.Cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: host, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			t.Errorf("server certificate for %s: %v", host, err)
		}
	}
	if _, err := cli.Cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client certificate: %v", err)
	}
	if cli.Cert.Subject.CommonName != ClientCommonName {
		t.Errorf("client CN %q", cli.Cert.Subject.CommonName)
	}

	// Init again keeps everything.
	before := readAll(t, dir)
	if err := Init(dir); err != nil {
		t.Fatal(err)
	}
	if after := readAll(t, dir); !maps.EqualFunc(before, after, bytes.Equal) {
		t.Fatal("second Init changed files")
	}

	// A missing client certificate is re-issued from the existing CA.
	os.Remove(p.ClientCert)
	os.Remove(p.ClientKey)
	if err := Init(dir); err != nil {
		t.Fatal(err)
	}
	if after := readAll(t, dir); !bytes.Equal(after["ca.pem"], before["ca.pem"]) || bytes.Equal(after["client.pem"], before["client.pem"]) {
		t.Fatal("client certificate not re-issued under the same CA")
	}

	// Half a pair is an error, not a silent replacement.
	os.Remove(p.ServerKey)
	if err := Init(dir); err == nil || !strings.Contains(err.Error(), "only one of the pair") {
		t.Fatalf("Init with half a pair: %v", err)
	}
}

func readAll(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = b
	}
	return out
}

func TestMasterKeyChecks(t *testing.T) {
	cases := []struct {
		name    string
		mutate  func(p Paths)
		wantErr string
	}{
		{"group readable", func(p Paths) { os.Chmod(p.MasterKey, 0o640) }, "must not be accessible"},
		{"short", func(p Paths) { os.WriteFile(p.MasterKey, []byte("short"), 0o600) }, "is 5 bytes"},
		{"wrong key for the store", func(p Paths) { os.WriteFile(p.MasterKey, bytes.Repeat([]byte{7}, 32), 0o600) }, "does not open under the master key"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := initDir(t)
			s := start(t, dir)
			createAES(t, dial(t, s), 256)
			tc.mutate(PathsFor(dir))
			_, err := Listen(dir, "127.0.0.1:0", quiet())
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Listen: %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// TestStateTransitions walks the KMIP life cycle, table driven: each step
// is an operation, the result reason it must give, and the state after it.
func TestStateTransitions(t *testing.T) {
	s := start(t, initDir(t))
	c := dial(t, s)
	type step struct {
		op     string
		reason kmip.ResultReason
		state  kmip.State
	}
	revoke := func(code kmip.RevocationReasonCode) func(id string) kmip.OperationPayload {
		return func(id string) kmip.OperationPayload {
			return &payloads.RevokeRequestPayload{UniqueIdentifier: id, RevocationReason: kmip.RevocationReason{RevocationReasonCode: code}}
		}
	}
	ops := map[string]func(id string) kmip.OperationPayload{
		"activate":   func(id string) kmip.OperationPayload { return &payloads.ActivateRequestPayload{UniqueIdentifier: id} },
		"destroy":    func(id string) kmip.OperationPayload { return &payloads.DestroyRequestPayload{UniqueIdentifier: id} },
		"get":        func(id string) kmip.OperationPayload { return &payloads.GetRequestPayload{UniqueIdentifier: id} },
		"deactivate": revoke(kmip.RevocationReasonCodeCessationOfOperation),
		"compromise": revoke(kmip.RevocationReasonCodeKeyCompromise),
	}
	ok := kmip.ResultReason(0)
	cases := []struct {
		name  string
		steps []step
	}{
		{"normal life", []step{
			{"get", ok, kmip.StatePreActive},
			{"activate", ok, kmip.StateActive},
			{"activate", kmip.ResultReasonPermissionDenied, kmip.StateActive},
			{"destroy", kmip.ResultReasonPermissionDenied, kmip.StateActive},
			{"deactivate", ok, kmip.StateDeactivated},
			{"get", ok, kmip.StateDeactivated}, // KMIP allows Get of a deactivated key (to decrypt old data)
			{"activate", kmip.ResultReasonPermissionDenied, kmip.StateDeactivated},
			{"destroy", ok, kmip.StateDestroyed},
			{"get", kmip.ResultReasonIllegalOperation, kmip.StateDestroyed},
			{"destroy", kmip.ResultReasonIllegalOperation, kmip.StateDestroyed},
			{"deactivate", kmip.ResultReasonIllegalOperation, kmip.StateDestroyed},
		}},
		{"destroy pre-active", []step{
			{"destroy", ok, kmip.StateDestroyed},
		}},
		{"compromised", []step{
			{"activate", ok, kmip.StateActive},
			{"compromise", ok, kmip.StateCompromised},
			{"deactivate", ok, kmip.StateCompromised},
			{"destroy", ok, kmip.StateDestroyedCompromised},
		}},
		{"deactivated then compromised", []step{
			{"activate", ok, kmip.StateActive},
			{"deactivate", ok, kmip.StateDeactivated},
			{"compromise", ok, kmip.StateCompromised},
		}},
		{"pre-active revoked", []step{
			{"deactivate", ok, kmip.StateDeactivated},
			{"activate", kmip.ResultReasonPermissionDenied, kmip.StateDeactivated},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id := createAES(t, c, 256)
			for i, st := range tc.steps {
				_, reason := do(t, c, ops[st.op](id))
				if reason != st.reason {
					t.Fatalf("step %d %s: reason %v, want %v", i, st.op, reason, st.reason)
				}
				if got := state(t, c, id); got != st.state {
					t.Fatalf("step %d %s: state %v, want %v", i, st.op, got, st.state)
				}
			}
		})
	}

	// Dates follow the transitions.
	id := createAES(t, c, 256)
	mustDo[*payloads.ActivateResponsePayload](t, c, ops["activate"](id))
	mustDo[*payloads.RevokeResponsePayload](t, c, ops["deactivate"](id))
	mustDo[*payloads.DestroyResponsePayload](t, c, ops["destroy"](id))
	ga := mustDo[*payloads.GetAttributesResponsePayload](t, c, &payloads.GetAttributesRequestPayload{UniqueIdentifier: id})
	for _, name := range []kmip.AttributeName{kmip.AttributeNameInitialDate, kmip.AttributeNameActivationDate,
		kmip.AttributeNameDeactivationDate, kmip.AttributeNameDestroyDate, kmip.AttributeNameRevocationReason, kmip.AttributeNameLastChangeDate} {
		if !slices.ContainsFunc(ga.Attribute, func(a kmip.Attribute) bool { return a.AttributeName == name }) {
			t.Errorf("attribute %q missing after the life cycle", name)
		}
	}
}

func TestCreateAndRegister(t *testing.T) {
	s := start(t, initDir(t))
	c := dial(t, s)
	for _, bits := range []int32{128, 192, 256} {
		id := createAES(t, c, bits)
		k, reason := getKey(t, c, id)
		if reason != 0 || len(k)*8 != int(bits) {
			t.Fatalf("AES-%d: %d bytes, %v", bits, len(k), reason)
		}
	}
	_, reason := do(t, c, &payloads.CreateRequestPayload{ObjectType: kmip.ObjectTypeSymmetricKey, TemplateAttribute: kmip.TemplateAttribute{Attribute: []kmip.Attribute{
		{AttributeName: kmip.AttributeNameCryptographicAlgorithm, AttributeValue: kmip.CryptographicAlgorithmAES},
		{AttributeName: kmip.AttributeNameCryptographicLength, AttributeValue: int32(512)},
	}}})
	if reason != kmip.ResultReasonInvalidField {
		t.Fatalf("AES-512: %v", reason)
	}
	_, reason = do(t, c, &payloads.CreateRequestPayload{ObjectType: kmip.ObjectTypeSymmetricKey, TemplateAttribute: kmip.TemplateAttribute{Attribute: []kmip.Attribute{
		{AttributeName: kmip.AttributeNameCryptographicAlgorithm, AttributeValue: kmip.CryptographicAlgorithm3DES},
		{AttributeName: kmip.AttributeNameCryptographicLength, AttributeValue: int32(168)},
	}}})
	if reason != kmip.ResultReasonFeatureNotSupported {
		t.Fatalf("3DES: %v", reason)
	}
	_, reason = do(t, c, &payloads.CreateRequestPayload{ObjectType: kmip.ObjectTypeSymmetricKey, TemplateAttribute: kmip.TemplateAttribute{Attribute: []kmip.Attribute{
		{AttributeName: kmip.AttributeNameCryptographicAlgorithm, AttributeValue: kmip.CryptographicAlgorithmAES},
		{AttributeName: kmip.AttributeNameCryptographicLength, AttributeValue: int32(256)},
		{AttributeName: kmip.AttributeNameState, AttributeValue: kmip.StateActive},
	}}})
	if reason != kmip.ResultReasonPermissionDenied {
		t.Fatalf("client-set State: %v", reason)
	}

	// Register: the same bytes come back, in both key formats.
	material := bytes.Repeat([]byte{0x5a}, 32)
	reg, err := c.Register().SymmetricKey(kmip.CryptographicAlgorithmAES, kmip.CryptographicUsageEncrypt, slices.Clone(material)).WithName("registered").ExecContext(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if got, reason := getKey(t, c, reg.UniqueIdentifier); reason != 0 || !bytes.Equal(got, material) {
		t.Fatalf("registered key: %x %v", got, reason)
	}
	tr := mustDo[*payloads.GetResponsePayload](t, c, &payloads.GetRequestPayload{UniqueIdentifier: reg.UniqueIdentifier, KeyFormatType: kmip.KeyFormatTypeTransparentSymmetricKey})
	if k, err := tr.SymmetricKey(); err != nil || !bytes.Equal(k, material) {
		t.Fatalf("transparent format: %x %v", k, err)
	}
	if _, reason := do(t, c, &payloads.GetRequestPayload{UniqueIdentifier: reg.UniqueIdentifier, KeyFormatType: kmip.KeyFormatTypePKCS_8}); reason != kmip.ResultReasonKeyFormatTypeNotSupported {
		t.Fatalf("PKCS#8 format: %v", reason)
	}
	_, err = c.Register().SymmetricKey(kmip.CryptographicAlgorithmAES, kmip.CryptographicUsageEncrypt, make([]byte, 20)).ExecContext(ctx(t))
	if err == nil {
		t.Fatal("registering a 160-bit AES key succeeded")
	}
	if state(t, c, reg.UniqueIdentifier) != kmip.StatePreActive {
		t.Fatal("registered key is not Pre-Active")
	}
	if _, reason := getKey(t, c, "nope"); reason != kmip.ResultReasonItemNotFound {
		t.Fatalf("Get(unknown): %v", reason)
	}
}

// TestBatchIDPlaceholder: Create then Activate and Get in one batch, the
// later items naming no id (KMIP ID placeholder).
func TestBatchIDPlaceholder(t *testing.T) {
	s := start(t, initDir(t))
	c := dial(t, s)
	res, err := c.Batch(ctx(t),
		&payloads.CreateRequestPayload{ObjectType: kmip.ObjectTypeSymmetricKey, TemplateAttribute: kmip.TemplateAttribute{Attribute: []kmip.Attribute{
			{AttributeName: kmip.AttributeNameCryptographicAlgorithm, AttributeValue: kmip.CryptographicAlgorithmAES},
			{AttributeName: kmip.AttributeNameCryptographicLength, AttributeValue: int32(256)},
		}}},
		&payloads.ActivateRequestPayload{},
		&payloads.GetRequestPayload{},
	)
	if err != nil {
		t.Fatal(err)
	}
	pls, err := res.Unwrap()
	if err != nil {
		t.Fatal(err)
	}
	id := pls[0].(*payloads.CreateResponsePayload).UniqueIdentifier
	if pls[1].(*payloads.ActivateResponsePayload).UniqueIdentifier != id || pls[2].(*payloads.GetResponsePayload).UniqueIdentifier != id {
		t.Fatal("placeholder not used")
	}
	if state(t, c, id) != kmip.StateActive {
		t.Fatal("not activated")
	}
}

func TestAttributesAndLocate(t *testing.T) {
	s := start(t, initDir(t))
	c := dial(t, s)
	name := func(n string) kmip.Attribute {
		return kmip.Attribute{AttributeName: kmip.AttributeNameName, AttributeValue: kmip.Name{NameValue: n, NameType: kmip.NameTypeUninterpretedTextString}}
	}
	a := createAES(t, c, 256, name("alpha"))
	b := createAES(t, c, 128, name("beta"), kmip.Attribute{AttributeName: kmip.AttributeNameObjectGroup, AttributeValue: "group-1"})
	mustDo[*payloads.ActivateResponsePayload](t, c, &payloads.ActivateRequestPayload{UniqueIdentifier: a})

	// Add Attribute: custom tags (multi-instance), indexes returned.
	for i, v := range []string{"vmcryptd", "second"} {
		resp := mustDo[*payloads.AddAttributeResponsePayload](t, c, &payloads.AddAttributeRequestPayload{
			UniqueIdentifier: a, Attribute: kmip.Attribute{AttributeName: "x-Vendor", AttributeValue: v},
		})
		if got := resp.Attribute.AttributeIndex; (i == 0) != (got == nil) || (got != nil && *got != int32(i)) {
			t.Fatalf("add %d: index %v", i, got)
		}
	}
	mustDo[*payloads.AddAttributeResponsePayload](t, c, &payloads.AddAttributeRequestPayload{
		UniqueIdentifier: a, Attribute: kmip.Attribute{AttributeName: kmip.AttributeNameContactInformation, AttributeValue: "ops@example"},
	})
	refusals := []struct {
		attr   kmip.Attribute
		reason kmip.ResultReason
	}{
		{kmip.Attribute{AttributeName: kmip.AttributeNameContactInformation, AttributeValue: "again"}, kmip.ResultReasonIllegalOperation},
		{kmip.Attribute{AttributeName: kmip.AttributeNameState, AttributeValue: kmip.StateDestroyed}, kmip.ResultReasonPermissionDenied},
		{kmip.Attribute{AttributeName: "Not An Attribute", AttributeValue: "v"}, kmip.ResultReasonInvalidField},
	}
	for _, r := range refusals {
		if _, reason := do(t, c, &payloads.AddAttributeRequestPayload{UniqueIdentifier: a, Attribute: r.attr}); reason != r.reason {
			t.Errorf("add %q: %v, want %v", r.attr.AttributeName, reason, r.reason)
		}
	}

	// Modify Attribute by index, Delete Attribute.
	idx := int32(1)
	mustDo[*payloads.ModifyAttributeResponsePayload](t, c, &payloads.ModifyAttributeRequestPayload{
		UniqueIdentifier: a, Attribute: kmip.Attribute{AttributeName: "x-Vendor", AttributeIndex: &idx, AttributeValue: "modified"},
	})
	mustDo[*payloads.DeleteAttributeResponsePayload](t, c, &payloads.DeleteAttributeRequestPayload{UniqueIdentifier: a, AttributeName: kmip.AttributeNameContactInformation})
	if _, reason := do(t, c, &payloads.ModifyAttributeRequestPayload{UniqueIdentifier: a, Attribute: kmip.Attribute{AttributeName: kmip.AttributeNameContactInformation, AttributeValue: "x"}}); reason != kmip.ResultReasonInvalidField {
		t.Errorf("modify of a deleted attribute: %v", reason)
	}

	ga := mustDo[*payloads.GetAttributesResponsePayload](t, c, &payloads.GetAttributesRequestPayload{UniqueIdentifier: a, AttributeName: []kmip.AttributeName{"x-Vendor"}})
	if len(ga.Attribute) != 2 {
		t.Fatalf("x-Vendor instances: %+v", ga.Attribute)
	}

	gl := mustDo[*payloads.GetAttributeListResponsePayload](t, c, &payloads.GetAttributeListRequestPayload{UniqueIdentifier: a})
	for _, want := range []kmip.AttributeName{kmip.AttributeNameUniqueIdentifier, kmip.AttributeNameState, kmip.AttributeNameName, "x-Vendor", kmip.AttributeNameCryptographicUsageMask} {
		if !slices.Contains(gl.AttributeName, want) {
			t.Errorf("Get Attribute List lacks %q: %v", want, gl.AttributeName)
		}
	}
	if slices.Contains(gl.AttributeName, kmip.AttributeNameContactInformation) {
		t.Error("deleted attribute still listed")
	}

	locate := func(attrs ...kmip.Attribute) []string {
		t.Helper()
		return mustDo[*payloads.LocateResponsePayload](t, c, &payloads.LocateRequestPayload{Attribute: attrs}).UniqueIdentifier
	}
	cases := []struct {
		name  string
		attrs []kmip.Attribute
		want  []string
	}{
		{"all, newest first", nil, []string{b, a}},
		{"by name", []kmip.Attribute{name("alpha")}, []string{a}},
		{"by unknown name", []kmip.Attribute{name("gamma")}, nil},
		{"by custom attribute", []kmip.Attribute{{AttributeName: "x-Vendor", AttributeValue: "vmcryptd"}}, []string{a}},
		{"by modified custom value", []kmip.Attribute{{AttributeName: "x-Vendor", AttributeValue: "modified"}}, []string{a}},
		{"by state", []kmip.Attribute{{AttributeName: kmip.AttributeNameState, AttributeValue: kmip.StatePreActive}}, []string{b}},
		{"by length", []kmip.Attribute{{AttributeName: kmip.AttributeNameCryptographicLength, AttributeValue: int32(256)}}, []string{a}},
		{"by group", []kmip.Attribute{{AttributeName: kmip.AttributeNameObjectGroup, AttributeValue: "group-1"}}, []string{b}},
		{"by usage mask subset", []kmip.Attribute{{AttributeName: kmip.AttributeNameCryptographicUsageMask, AttributeValue: kmip.CryptographicUsageEncrypt}}, []string{b, a}},
		{"by usage mask not held", []kmip.Attribute{{AttributeName: kmip.AttributeNameCryptographicUsageMask, AttributeValue: kmip.CryptographicUsageSign}}, nil},
		{"two filters", []kmip.Attribute{{AttributeName: kmip.AttributeNameObjectType, AttributeValue: kmip.ObjectTypeSymmetricKey}, name("beta")}, []string{b}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := locate(tc.attrs...); !slices.Equal(got, tc.want) {
				t.Fatalf("Locate = %v, want %v", got, tc.want)
			}
		})
	}
	lr := mustDo[*payloads.LocateResponsePayload](t, c, &payloads.LocateRequestPayload{MaximumItems: 1})
	if len(lr.UniqueIdentifier) != 1 || lr.UniqueIdentifier[0] != b || lr.LocatedItems == nil || *lr.LocatedItems != 2 {
		t.Fatalf("Locate max 1: %v located=%v", lr.UniqueIdentifier, lr.LocatedItems)
	}
}

// TestPersistenceAtRest: keys survive a restart, and no file in the lab
// directory holds key bytes in the clear (raw, hex or base64).
func TestPersistenceAtRest(t *testing.T) {
	dir := initDir(t)
	keys := map[string][]byte{}
	func() {
		s, err := Listen(dir, "127.0.0.1:0", quiet())
		if err != nil {
			t.Fatal(err)
		}
		go s.Serve()
		defer s.Close()
		c := dial(t, s)
		for i := 0; i < 5; i++ {
			id := createAES(t, c, 256)
			mustDo[*payloads.ActivateResponsePayload](t, c, &payloads.ActivateRequestPayload{UniqueIdentifier: id})
			k, reason := getKey(t, c, id)
			if reason != 0 {
				t.Fatal(reason)
			}
			keys[id] = k
		}
	}()

	files := readAll(t, dir)
	if err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for id, k := range keys {
			for _, enc := range [][]byte{k, []byte(hex.EncodeToString(k)), []byte(base64.StdEncoding.EncodeToString(k)), []byte(base64.StdEncoding.EncodeToString(k)[:40])} {
				if bytes.Contains(data, enc) {
					t.Errorf("%s contains key %s in the clear", path, id)
				}
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(files["objects.json"], []byte("sealed_key")) {
		t.Fatal("objects.json holds no sealed keys")
	}
	if fi, err := os.Stat(PathsFor(dir).Store); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("store mode: %v %v", fi.Mode(), err)
	}

	// Restart: same keys, same states.
	s := start(t, dir)
	c := dial(t, s)
	for id, want := range keys {
		got, reason := getKey(t, c, id)
		if reason != 0 || !bytes.Equal(got, want) {
			t.Fatalf("key %s after restart: %v", id, reason)
		}
		if state(t, c, id) != kmip.StateActive {
			t.Fatalf("key %s lost its state", id)
		}
	}

	// A sealed key moved to another object's record does not open: the
	// object id is bound as associated data.
	var ids []string
	for id := range keys {
		ids = append(ids, id)
	}
	st, err := openStore(PathsFor(dir).Store, mustMaster(t, dir), nil)
	if err != nil {
		t.Fatal(err)
	}
	o1, o2 := st.objs[ids[0]], st.objs[ids[1]]
	swapped := &object{uid: o1.uid, sealed: o2.sealed}
	if _, err := st.unseal(swapped); err == nil {
		t.Fatal("a sealed key opened under another object's id")
	}
}

func mustMaster(t *testing.T, dir string) []byte {
	t.Helper()
	k, err := readMasterKey(PathsFor(dir).MasterKey)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestCloseWithSilentClient: a client that connects and never speaks TLS
// must not hold up Close.
func TestCloseWithSilentClient(t *testing.T) {
	s, err := Listen(initDir(t), "127.0.0.1:0", quiet())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	raw, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Close took %v", d)
	}
}

func TestQueryAndVersions(t *testing.T) {
	s := start(t, initDir(t))
	for _, v := range []kmip.ProtocolVersion{kmip.V1_0, kmip.V1_1, kmip.V1_2, kmip.V1_3, kmip.V1_4} {
		c := dial(t, s, v)
		if c.Version() != v {
			t.Fatalf("negotiated %v, want %v", c.Version(), v)
		}
		q := mustDo[*payloads.QueryResponsePayload](t, c, &payloads.QueryRequestPayload{QueryFunction: []kmip.QueryFunction{
			kmip.QueryFunctionOperations, kmip.QueryFunctionObjects, kmip.QueryFunctionServerInformation,
		}})
		if q.VendorIdentification != VendorIdentification || !slices.Contains(q.Operations, kmip.OperationLocate) || !slices.Equal(q.ObjectType, []kmip.ObjectType{kmip.ObjectTypeSymmetricKey}) {
			t.Fatalf("Query under %v: %+v", v, q)
		}
		id := createAES(t, c, 256)
		if _, reason := getKey(t, c, id); reason != 0 {
			t.Fatalf("Get under %v: %v", v, reason)
		}
	}
}

package labkms

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/payloads"
)

func TestBadValue(t *testing.T) {
	for _, tc := range []struct {
		name string
		a    kmip.Attribute
		bad  string // substring of the reason; "" = acceptable
	}{
		{"zero usage mask", kmip.Attribute{AttributeName: kmip.AttributeNameCryptographicUsageMask, AttributeValue: kmip.CryptographicUsageMask(0)}, "permits no use"},
		{"encrypt|decrypt", kmip.Attribute{AttributeName: kmip.AttributeNameCryptographicUsageMask, AttributeValue: kmip.CryptographicUsageEncrypt | kmip.CryptographicUsageDecrypt}, ""},
		{"extension usage bit", kmip.Attribute{AttributeName: kmip.AttributeNameCryptographicUsageMask, AttributeValue: kmip.CryptographicUsageMask(1 << 30)}, ""},
		{"name", kmip.Attribute{AttributeName: kmip.AttributeNameName, AttributeValue: kmip.Name{NameValue: "k", NameType: kmip.NameTypeUninterpretedTextString}}, ""},
		{"custom text", kmip.Attribute{AttributeName: "x-Vendor", AttributeValue: "vmcryptd"}, ""},
		{"custom empty text", kmip.Attribute{AttributeName: "x-Note", AttributeValue: ""}, ""},
		{"object group", kmip.Attribute{AttributeName: kmip.AttributeNameObjectGroup, AttributeValue: "g"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := badValue(tc.a)
			if tc.bad == "" && got != "" || tc.bad != "" && !strings.Contains(got, tc.bad) {
				t.Fatalf("badValue = %q, want %q", got, tc.bad)
			}
		})
	}
}

// TestStoreValidatesInput: Create, Register, Add and Modify Attribute
// refuse a value the store could not load again (issue 11 item 6), and
// after them the server still starts and serves every key.
func TestStoreValidatesInput(t *testing.T) {
	dir := initDir(t)
	s := start(t, dir)
	c := dial(t, s)
	good := createAES(t, c, 256)
	zero := kmip.Attribute{AttributeName: kmip.AttributeNameCryptographicUsageMask, AttributeValue: kmip.CryptographicUsageMask(0)}
	aes := kmip.Attribute{AttributeName: kmip.AttributeNameCryptographicAlgorithm, AttributeValue: kmip.CryptographicAlgorithmAES}
	bits := kmip.Attribute{AttributeName: kmip.AttributeNameCryptographicLength, AttributeValue: int32(256)}
	for _, tc := range []struct {
		name string
		req  kmip.OperationPayload
	}{
		{"create", &payloads.CreateRequestPayload{ObjectType: kmip.ObjectTypeSymmetricKey,
			TemplateAttribute: kmip.TemplateAttribute{Attribute: []kmip.Attribute{aes, bits, zero}}}},
		{"register", &payloads.RegisterRequestPayload{ObjectType: kmip.ObjectTypeSymmetricKey,
			TemplateAttribute: kmip.TemplateAttribute{Attribute: []kmip.Attribute{zero}},
			Object: &kmip.SymmetricKey{KeyBlock: kmip.KeyBlock{KeyFormatType: kmip.KeyFormatTypeRaw,
				KeyValue:               &kmip.KeyValue{Plain: &kmip.PlainKeyValue{KeyMaterial: kmip.KeyMaterial{Bytes: ptr(bytes.Repeat([]byte{7}, 32))}}},
				CryptographicAlgorithm: kmip.CryptographicAlgorithmAES, CryptographicLength: 256}}}},
		{"modify", &payloads.ModifyAttributeRequestPayload{UniqueIdentifier: good, Attribute: zero}},
	} {
		if _, reason := do(t, c, tc.req); reason != kmip.ResultReasonInvalidField {
			t.Errorf("%s with a zero usage mask: result reason %v, want Invalid Field", tc.name, reason)
		}
	}
	// Add Attribute: the mask is single-instance and set, so use a fresh
	// key without one.
	bare := mustDo[*payloads.CreateResponsePayload](t, c, &payloads.CreateRequestPayload{ObjectType: kmip.ObjectTypeSymmetricKey,
		TemplateAttribute: kmip.TemplateAttribute{Attribute: []kmip.Attribute{aes, bits}}}).UniqueIdentifier
	if _, reason := do(t, c, &payloads.AddAttributeRequestPayload{UniqueIdentifier: bare, Attribute: zero}); reason != kmip.ResultReasonInvalidField {
		t.Errorf("add a zero usage mask: result reason %v, want Invalid Field", reason)
	}
	want, reason := getKey(t, c, good)
	if reason != 0 {
		t.Fatal(reason)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := start(t, dir)
	if got, reason := getKey(t, dial(t, s2), good); reason != 0 || !bytes.Equal(got, want) {
		t.Fatalf("key after restart: %v", reason)
	}
}

func ptr[T any](v T) *T { return &v }

// syncBuffer is a log sink for one test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestPoisonedStoreQuarantined reproduces issue 11 item 6 on disk: a
// stored key whose Cryptographic Usage Mask reads "" (what PyKMIP's
// register() without masks left in the store before Register was
// validated), plus a malformed and a duplicate object. The server starts,
// serves every other key, moves the bad objects verbatim to
// objects.json.quarantine with a log line naming each, and starts again
// cleanly.
func TestPoisonedStoreQuarantined(t *testing.T) {
	dir := initDir(t)
	keys := map[string][]byte{}
	var ids []string
	func() {
		s, err := Listen(dir, "127.0.0.1:0", quiet())
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- s.Serve() }()
		defer func() {
			if err := s.Close(); err != nil {
				t.Error(err)
			}
			<-done
		}()
		c := dial(t, s)
		for range 3 {
			id := createAES(t, c, 256)
			mustDo[*payloads.ActivateResponsePayload](t, c, &payloads.ActivateRequestPayload{UniqueIdentifier: id})
			k, reason := getKey(t, c, id)
			if reason != 0 {
				t.Fatal(reason)
			}
			keys[id] = k
			ids = append(ids, id)
		}
	}()

	path := PathsFor(dir).Store
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var f map[string]any
	if err := json.Unmarshal(raw, &f); err != nil {
		t.Fatal(err)
	}
	objs := f["objects"].([]any)
	poisoned := ids[1]
	var poisonedJSON string
	for _, o := range objs {
		om := o.(map[string]any)
		if om["uid"] != poisoned {
			continue
		}
		b, _ := json.Marshal(om["attributes"])
		attrs := strings.Replace(string(b), `"Encrypt|Decrypt"`, `""`, 1)
		if attrs == string(b) {
			t.Fatalf("no usage mask to poison in %s", b)
		}
		om["attributes"] = json.RawMessage(attrs)
		b, _ = json.Marshal(om)
		poisonedJSON = string(b)
	}
	dup := objs[0]
	objs = append(objs, map[string]any{"uid": 42}, dup)
	f["objects"] = objs
	raw, _ = json.Marshal(f)
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}

	var logs syncBuffer
	s, err := Listen(dir, "127.0.0.1:0", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatalf("lab KMS refused to start on a store with one bad object: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	t.Cleanup(func() {
		s.Close()
		<-done
	})
	c := dial(t, s)
	for _, id := range []string{ids[0], ids[2]} {
		if got, reason := getKey(t, c, id); reason != 0 || !bytes.Equal(got, keys[id]) {
			t.Errorf("key %s not served after the quarantine: %v", id, reason)
		}
	}
	if _, reason := getKey(t, c, poisoned); reason != kmip.ResultReasonItemNotFound {
		t.Errorf("quarantined key %s: result reason %v, want Item Not Found", poisoned, reason)
	}
	log := logs.String()
	if n := strings.Count(log, "stored object quarantined"); n != 3 {
		t.Errorf("%d quarantine log lines, want 3:\n%s", n, log)
	}
	if !strings.Contains(log, "object "+poisoned+": attributes:") || !strings.Contains(log, "duplicate uid") {
		t.Errorf("log does not name the bad objects:\n%s", log)
	}
	q, err := os.ReadFile(path + ".quarantine")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(q)), "\n")
	if len(lines) != 3 {
		t.Fatalf("quarantine file has %d lines, want 3:\n%s", len(lines), q)
	}
	var first quarantined
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
		t.Fatal(err)
	}
	var gotObj, wantObj any
	json.Unmarshal(first.Object, &gotObj)
	json.Unmarshal([]byte(poisonedJSON), &wantObj)
	if !strings.Contains(first.Reason, poisoned) || !jsonEqual(gotObj, wantObj) {
		t.Errorf("quarantine entry %s, want the poisoned object verbatim", lines[0])
	}
	if store, _ := os.ReadFile(path); bytes.Contains(store, []byte(poisoned)) {
		t.Error("the store still holds the quarantined object")
	}
	// The store on disk is clean again: a restart quarantines nothing.
	s.Close()
	<-done
	logs = syncBuffer{}
	s2, err := Listen(dir, "127.0.0.1:0", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if strings.Contains(logs.String(), "quarantined") {
		t.Errorf("second start quarantined again:\n%s", logs.String())
	}
	if q2, _ := os.ReadFile(path + ".quarantine"); !bytes.Equal(q2, q) {
		t.Error("quarantine file changed on a clean start")
	}
	done <- nil // for the cleanup's receive
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

// TestWrongMasterKeyStillRefused: quarantine is for single bad objects;
// a master key that opens no sealed key still stops the server.
func TestWrongMasterKeyStillRefused(t *testing.T) {
	dir := initDir(t)
	s, err := Listen(dir, "127.0.0.1:0", quiet())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	createAES(t, dial(t, s), 256)
	s.Close()
	<-done
	if err := os.WriteFile(PathsFor(dir).MasterKey, bytes.Repeat([]byte{1}, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(dir, "127.0.0.1:0", quiet()); err == nil || !strings.Contains(err.Error(), "master key") {
		t.Fatalf("Listen with a wrong master key: %v", err)
	}
	if _, err := os.Stat(PathsFor(dir).Store + ".quarantine"); err == nil {
		t.Fatal("a wrong master key quarantined the store")
	}
}

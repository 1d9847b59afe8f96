package mgrproto

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"strings"
	"testing"
)

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	q := Request{Op: OpRegisterVM, VM: &VM{ID: "v", Keys: []KeyRef{{"p", "k"}}}}
	if err := WriteFrame(&buf, q); err != nil {
		t.Fatal(err)
	}
	if n := binary.BigEndian.Uint32(buf.Bytes()); int(n) != buf.Len()-4 {
		t.Fatalf("length prefix %d, body %d", n, buf.Len()-4)
	}
	var got Request
	if err := ReadFrame(&buf, &got); err != nil || got.VM.Keys[0].String() != "p/k" || got.Check() != nil {
		t.Fatalf("%+v %v", got, err)
	}
	if err := WriteFrame(&buf, Request{Op: OpCreateKey, Name: strings.Repeat("x", MaxFrame)}); err == nil {
		t.Fatal("an oversized frame was written")
	}
}

func TestRequestCheck(t *testing.T) {
	long := strings.Repeat("x", MaxField+1)
	for _, c := range []struct {
		q    Request
		want string
	}{
		{Request{Op: OpHello, Status: &HostStatus{}}, ""},
		{Request{Op: OpHello}, "needs status"},
		{Request{Op: OpHello, Status: &HostStatus{Held: make([]KeyRef, MaxHeld+1)}}, "held keys"},
		{Request{Op: OpCreateKey, Name: "n"}, ""},
		{Request{Op: OpCreateKey}, "needs name"},
		{Request{Op: OpGetKey, Provider: "p", KeyID: "k"}, ""},
		{Request{Op: OpGetKey, Provider: "p", KeyID: long}, "longer than"},
		{Request{Op: OpRegisterVM, VM: &VM{ID: "v"}}, "1 to 64 keys"},
		{Request{Op: OpRegisterVM, VM: &VM{ID: "v", Keys: []KeyRef{{"p", ""}}}}, "needs provider and key_id"},
		{Request{Op: OpRegisterVM, VM: &VM{ID: long, Keys: []KeyRef{{"p", "k"}}}}, "longer than"},
		{Request{Op: OpUnregisterVM}, "needs vm_id"},
		{Request{Op: OpListPolicies}, ""},
		{Request{Op: OpGetPolicy, Policy: "Gold"}, ""},
		{Request{Op: OpGetPolicy}, "needs policy"},
		{Request{Op: OpGetPolicy, Policy: long}, "longer than"},
		{Request{Op: OpRegisterVM, VM: &VM{ID: "v", Policy: long, Keys: []KeyRef{{"p", "k"}}}}, "longer than"},
		{Request{Op: OpRegisterVM, VM: &VM{ID: "v", Policy: "Gold", Keys: []KeyRef{{"p", "k"}}}}, ""},
		{Request{}, "no op"},
		{Request{Op: "x"}, "unknown op"},
	} {
		err := c.q.Check()
		if (c.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%+v: %v, want %q", c.q, err, c.want)
		}
	}
}

// FuzzReadFrame: whatever bytes a peer sends, reading and checking a
// request never panics, and never reads past a refused length.
func FuzzReadFrame(f *testing.F) {
	var b bytes.Buffer
	WriteFrame(&b, Request{Op: OpGetKey, Provider: "p", KeyID: "k"})
	f.Add(b.Bytes())
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, '{'})
	f.Add(append(binary.BigEndian.AppendUint32(nil, 11), `{"op":null}`...))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		var q Request
		if err := ReadFrame(r, &q); err == nil {
			_ = q.Check()
		} else if len(data) >= 4 && binary.BigEndian.Uint32(data) > MaxFrame && r.Len() != len(data)-4 {
			t.Fatalf("read %d bytes of a refused frame", len(data)-4-r.Len())
		}
	})
}

// TestPolicyExamplesInDoc: the get_policy and list_policies frames of
// docs/MANAGER.md are what WriteFrame writes, length prefix included.
func TestPolicyExamplesInDoc(t *testing.T) {
	doc, err := os.ReadFile("../../docs/MANAGER.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []any{
		Request{Op: OpGetPolicy, Policy: "Gold"},
		Reply{OK: true, Policy: &Policy{Name: "Gold", Encrypts: true, Provider: "lab", Description: "PCI VMs"}},
		Request{Op: OpListPolicies},
	} {
		var b bytes.Buffer
		if err := WriteFrame(&b, v); err != nil {
			t.Fatal(err)
		}
		prefix := fmt.Sprintf("`% x`", b.Bytes()[:4])
		body := b.Bytes()[4:]
		if !bytes.Contains(doc, body) || !bytes.Contains(doc, []byte(prefix)) || !bytes.Contains(doc, []byte(fmt.Sprintf("%d bytes", len(body)))) {
			t.Errorf("MANAGER.md lacks the frame %s %s (%d bytes)", prefix, body, len(body))
		}
	}
}

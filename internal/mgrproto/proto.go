// Package mgrproto is the host channel between a vmcryptd host daemon and
// the manager (docs/MANAGER.md): message types, framing and the host-side
// client. Messages are length-prefixed JSON over mutual TLS 1.3; a key
// travels only as raw bytes after the reply that announces it, never
// inside JSON.
package mgrproto

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// ALPN is the TLS application protocol both sides require.
const ALPN = "vmcryptd-manager/1"

// Limits of the host channel.
const (
	// MaxFrame is the largest JSON frame either side accepts.
	MaxFrame = 256 << 10
	// KeyLen is the only key length a reply may announce (AES-256).
	KeyLen = 32
	// MaxVMKeys bounds the key references of one VM registration.
	MaxVMKeys = 64
	// MaxHeld bounds the held-key list of a hello.
	MaxHeld = 2048
	// MaxField bounds every string field (names, ids, directories).
	MaxField = 4096
	// MaxPolicies bounds the storage policies a manager holds (built-ins
	// included), so a list_policies reply always fits in one frame.
	MaxPolicies = 256
	// MaxPolicyName and MaxPolicyDescription bound a policy's name and
	// description (bytes).
	MaxPolicyName        = 80
	MaxPolicyDescription = 256
)

// The two built-in storage policies, which every manager (and every
// direct-mode host) has and which cannot be removed. They are the names
// vm.PolicyEncrypt and vm.PolicyDefault (engine/vm) write in a vmx.
const (
	PolicyEncrypt = "VM Encryption Policy"
	PolicyDefault = "Datastore Default"
)

// Operations.
const (
	OpHello        = "hello"
	OpCreateKey    = "create_key"
	OpGetKey       = "get_key"
	OpRegisterVM   = "register_vm"
	OpUnregisterVM = "unregister_vm"
	OpWatch        = "watch"
	OpListPolicies = "list_policies"
	OpGetPolicy    = "get_policy"
)

// WatchHold is how long the manager holds a watch request whose answer
// would not change anything for the host before answering anyway.
const WatchHold = 25 * time.Second

// Error codes of a refused request.
const (
	CodeBadRequest  = "bad_request" // malformed, oversized or unknown request
	CodeDenied      = "denied"      // the host may not do this (need to know)
	CodeRevoked     = "revoked"     // the host's certificate is unknown or was revoked
	CodeUnavailable = "unavailable" // the KMS could not serve it; retry later
	CodeInternal    = "internal"    // the manager failed (its state could not be saved)
	CodeHostLocked  = "host_locked" // the manager locked this host: no key until unlock
	CodeNotFound    = "not_found"   // get_policy: the manager has no policy of that name
)

// KeyRef names a KEK: key provider plus key id.
type KeyRef struct {
	Provider string `json:"provider"`
	KeyID    string `json:"key_id"`
}

func (r KeyRef) String() string { return r.Provider + "/" + r.KeyID }

// VM is a VM registration: its vmcryptd VM id (the vmx's vmcryptd.vmId),
// display name, directory on the host and every KEK it needs.
type VM struct {
	ID   string   `json:"id"`
	Name string   `json:"name,omitempty"`
	Dir  string   `json:"dir,omitempty"`
	Keys []KeyRef `json:"keys"`
	// Policy is the storage policy the host set on the VM (`vmcryptd
	// policy set`); empty: keep the one the manager has recorded (or
	// PolicyEncrypt for a VM it did not have).
	Policy string `json:"policy,omitempty"`
}

// Policy is a storage policy as the manager resolves it for a host.
type Policy struct {
	Name string `json:"name"`
	// Encrypts: a VM under it is encrypted, with a KEK of Provider;
	// otherwise a VM under it is decrypted (stored plain).
	Encrypts bool `json:"encrypts"`
	// Provider is the key provider the policy resolves to now (its own,
	// or the manager's default); empty for a policy that does not encrypt.
	Provider    string `json:"provider,omitempty"`
	Builtin     bool   `json:"builtin,omitempty"`
	Description string `json:"description,omitempty"`
}

// HostStatus is what a host reports in a hello (heartbeat).
type HostStatus struct {
	Version string  `json:"version,omitempty"`
	HostKey *KeyRef `json:"host_key,omitempty"` // host encryption mode key; nil when off
	// Held are the KEKs the host has in memory now.
	Held []KeyRef `json:"held,omitempty"`
}

// Request is one host request. Which fields are used depends on Op.
type Request struct {
	Op       string      `json:"op"`
	Provider string      `json:"provider,omitempty"` // create_key (empty: the manager's default), get_key
	KeyID    string      `json:"key_id,omitempty"`   // get_key
	Name     string      `json:"name,omitempty"`     // create_key: the key's name on the KMS
	VMID     string      `json:"vm_id,omitempty"`    // get_key (optional: the VM it is for), unregister_vm
	VM       *VM         `json:"vm,omitempty"`       // register_vm
	Status   *HostStatus `json:"status,omitempty"`   // hello
	// Locked is, in a watch, whether the host holds itself locked by the
	// manager now: the manager answers as soon as that is no longer so.
	Locked bool `json:"locked,omitempty"`
	// Policy is, in a get_policy, the name of the storage policy asked for.
	Policy string `json:"policy,omitempty"`
}

// Reply answers one request.
type Reply struct {
	OK    bool   `json:"ok"`
	Code  string `json:"code,omitempty"`
	Error string `json:"error,omitempty"`
	// hello
	Host            string   `json:"host,omitempty"`
	DefaultProvider string   `json:"default_provider,omitempty"`
	Providers       []string `json:"providers,omitempty"`
	// hello, watch: the manager has locked this host (zero every key,
	// fetch none until unlocked), and why.
	Locked     bool   `json:"locked,omitempty"`
	LockReason string `json:"lock_reason,omitempty"`
	// create_key
	Provider string `json:"provider,omitempty"`
	KeyID    string `json:"key_id,omitempty"`
	// get_key: the key's KMIP state, and the number of raw key bytes that
	// follow this frame on the stream.
	State  string `json:"state,omitempty"`
	KeyLen int    `json:"key_len,omitempty"`
	// list_policies: every storage policy; get_policy: the one asked for.
	Policies []Policy `json:"policies,omitempty"`
	Policy   *Policy  `json:"policy,omitempty"`
}

// WriteFrame writes v as one frame: a 4-byte big-endian length, then
// that many bytes of JSON.
func WriteFrame(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > MaxFrame {
		return fmt.Errorf("frame of %d bytes exceeds the %d-byte limit", len(b), MaxFrame)
	}
	buf := make([]byte, 4, 4+len(b))
	binary.BigEndian.PutUint32(buf, uint32(len(b)))
	_, err = w.Write(append(buf, b...))
	return err
}

// ErrFrameTooLarge is returned by ReadFrame for a length over MaxFrame.
var ErrFrameTooLarge = errors.New("frame exceeds the limit")

// ReadFrame reads one frame and decodes it into v, refusing frames over
// MaxFrame (nothing of them is read), an empty frame, unknown fields and
// trailing data. io.EOF means the peer closed cleanly between frames.
func ReadFrame(r io.Reader, v any) error {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > MaxFrame {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrFrameTooLarge, n, MaxFrame)
	}
	if n == 0 {
		return errors.New("empty frame")
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return fmt.Errorf("frame of %d bytes cut short: %w", n, err)
	}
	return Decode(b, v)
}

// Decode parses one frame's JSON strictly.
func Decode(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("malformed frame: %w", err)
	}
	if dec.More() {
		return errors.New("malformed frame: data after the JSON object")
	}
	return nil
}

// Check validates a request's fields for its operation: which fields it
// needs and the limits. It is the one place a request's shape is judged.
func (q *Request) Check() error {
	long := func(s string) bool { return len(s) > MaxField }
	for _, s := range []string{q.Provider, q.KeyID, q.Name, q.VMID, q.Policy} {
		if long(s) {
			return fmt.Errorf("a field is longer than %d bytes", MaxField)
		}
	}
	switch q.Op {
	case OpHello:
		if q.Status == nil {
			return errors.New("hello needs status")
		}
		if len(q.Status.Held) > MaxHeld {
			return fmt.Errorf("hello lists %d held keys, at most %d", len(q.Status.Held), MaxHeld)
		}
	case OpCreateKey:
		if q.Name == "" {
			return errors.New("create_key needs name")
		}
	case OpGetKey:
		if q.Provider == "" || q.KeyID == "" {
			return errors.New("get_key needs provider and key_id")
		}
	case OpRegisterVM:
		vm := q.VM
		if vm == nil || vm.ID == "" {
			return errors.New("register_vm needs vm.id")
		}
		if long(vm.ID) || long(vm.Name) || long(vm.Dir) || long(vm.Policy) {
			return fmt.Errorf("a field is longer than %d bytes", MaxField)
		}
		if len(vm.Keys) == 0 || len(vm.Keys) > MaxVMKeys {
			return fmt.Errorf("register_vm needs 1 to %d keys, got %d", MaxVMKeys, len(vm.Keys))
		}
		for _, k := range vm.Keys {
			if k.Provider == "" || k.KeyID == "" || long(k.Provider) || long(k.KeyID) {
				return errors.New("register_vm: a key needs provider and key_id")
			}
		}
	case OpUnregisterVM:
		if q.VMID == "" {
			return errors.New("unregister_vm needs vm_id")
		}
	case OpWatch, OpListPolicies:
	case OpGetPolicy:
		if q.Policy == "" {
			return errors.New("get_policy needs policy")
		}
	case "":
		return errors.New("request has no op")
	default:
		return fmt.Errorf("unknown op %q", q.Op)
	}
	return nil
}

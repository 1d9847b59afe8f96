package kms

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/payloads"
	"github.com/ovh/kmip-go/ttlv"
)

// KEKBits is the only key size vmcryptd uses as a key-encryption key.
const KEKBits = 256

// Tags written on every key vmcryptd creates, as vCenter writes x-Vendor,
// x-Product and x-Name. Servers that refuse Add Attribute (PyKMIP) simply
// do not get them.
const (
	TagVendor  = "x-Vendor"
	TagProduct = "x-Product"
	TagName    = "x-Name"

	VendorValue  = "vmcryptd"
	ProductValue = "vmcryptd"
)

// KeyState is the KMIP life-cycle state of a managed object.
type KeyState int

const (
	StateUnknown KeyState = iota
	StatePreActive
	StateActive
	StateDeactivated
	StateCompromised
	StateDestroyed
	StateDestroyedCompromised
)

func (s KeyState) String() string {
	switch s {
	case StatePreActive:
		return "Pre-Active"
	case StateActive:
		return "Active"
	case StateDeactivated:
		return "Deactivated"
	case StateCompromised:
		return "Compromised"
	case StateDestroyed:
		return "Destroyed"
	case StateDestroyedCompromised:
		return "Destroyed Compromised"
	}
	return "Unknown"
}

func stateFromKMIP(s kmip.State) KeyState {
	switch s {
	case kmip.StatePreActive:
		return StatePreActive
	case kmip.StateActive:
		return StateActive
	case kmip.StateDeactivated:
		return StateDeactivated
	case kmip.StateCompromised:
		return StateCompromised
	case kmip.StateDestroyed:
		return StateDestroyed
	case kmip.StateDestroyedCompromised:
		return StateDestroyedCompromised
	}
	return StateUnknown
}

// unwrapStateError explains why a key in state st may not even be used to
// unwrap (decrypt), or nil. KMIP (1.4 §3.22) lets a Deactivated or
// Compromised key process cryptographically protected information
// (decrypt, unwrap); only Active keys may protect new information, which
// is the caller's check (engine: kekUse).
func unwrapStateError(st KeyState) error {
	switch st {
	case StateActive, StateDeactivated, StateCompromised:
		return nil
	}
	return stateError(st)
}

// stateError explains why a key in state st cannot be used, or nil if it
// is Active.
func stateError(st KeyState) error {
	switch st {
	case StateActive:
		return nil
	case StateDeactivated, StateCompromised:
		return cause(ErrKeyRevoked, "state "+st.String(), nil)
	case StateDestroyed, StateDestroyedCompromised:
		return cause(ErrKeyDestroyed, "state "+st.String(), nil)
	case StatePreActive:
		return cause(ErrKeyNotActive, "state "+st.String(), nil)
	}
	return cause(ErrKeyNotActive, "state "+st.String(), nil)
}

// RevocationReason says why a key is revoked. Its values are the KMIP
// revocation reason codes spelled for command lines.
type RevocationReason string

const (
	RevokeUnspecified          RevocationReason = "unspecified"
	RevokeKeyCompromise        RevocationReason = "key-compromise"
	RevokeAffiliationChanged   RevocationReason = "affiliation-changed"
	RevokeSuperseded           RevocationReason = "superseded"
	RevokeCessationOfOperation RevocationReason = "cessation-of-operation"
	RevokePrivilegeWithdrawn   RevocationReason = "privilege-withdrawn"
)

func (r RevocationReason) code() (kmip.RevocationReasonCode, error) {
	switch r {
	case RevokeUnspecified, "":
		return kmip.RevocationReasonCodeUnspecified, nil
	case RevokeKeyCompromise:
		return kmip.RevocationReasonCodeKeyCompromise, nil
	case RevokeAffiliationChanged:
		return kmip.RevocationReasonCodeAffiliationChanged, nil
	case RevokeSuperseded:
		return kmip.RevocationReasonCodeSuperseded, nil
	case RevokeCessationOfOperation:
		return kmip.RevocationReasonCodeCessationOfOperation, nil
	case RevokePrivilegeWithdrawn:
		return kmip.RevocationReasonCodePrivilegeWithdrawn, nil
	}
	return 0, fmt.Errorf("unknown revocation reason %q", string(r))
}

// CreateKey creates an AES-256 key usable for Encrypt and Decrypt, named
// name (KMIP Name attribute, so Locate finds it), activates it and tags it
// with x-Vendor, x-Product and x-Name. It returns the server's unique id.
func (p *Provider) CreateKey(ctx context.Context, name string) (string, error) {
	var id string
	err := p.run(ctx, fmt.Sprintf("create key %q", name), func(ctx context.Context, s *session) error {
		attrs := []kmip.Attribute{
			{AttributeName: kmip.AttributeNameCryptographicAlgorithm, AttributeValue: kmip.CryptographicAlgorithmAES},
			{AttributeName: kmip.AttributeNameCryptographicLength, AttributeValue: int32(KEKBits)},
			{AttributeName: kmip.AttributeNameCryptographicUsageMask, AttributeValue: kmip.CryptographicUsageEncrypt | kmip.CryptographicUsageDecrypt},
		}
		if name != "" {
			attrs = append(attrs, kmip.Attribute{
				AttributeName:  kmip.AttributeNameName,
				AttributeValue: kmip.Name{NameValue: name, NameType: kmip.NameTypeUninterpretedTextString},
			})
		}
		resp, err := s.call(ctx, &payloads.CreateRequestPayload{
			ObjectType:        kmip.ObjectTypeSymmetricKey,
			TemplateAttribute: kmip.TemplateAttribute{Attribute: attrs},
		})
		if err != nil {
			return err
		}
		cr, ok := resp.(*payloads.CreateResponsePayload)
		if !ok || cr.UniqueIdentifier == "" {
			return &kmipError{Operation: kmip.OperationCreate, Reason: kmip.ResultReasonGeneralFailure, Message: "response has no unique identifier"}
		}
		newID := cr.UniqueIdentifier
		if _, err := s.call(ctx, &payloads.ActivateRequestPayload{UniqueIdentifier: newID}); err != nil {
			// Leave no half-made key behind when we still can; if the
			// connection broke, the key stays Pre-Active on that server and
			// is never handed out (GetKey refuses non-Active keys).
			var te *transportError
			if !errors.As(err, &te) {
				if _, derr := s.call(ctx, &payloads.DestroyRequestPayload{UniqueIdentifier: newID}); derr != nil {
					p.log.Warn("could not destroy key left Pre-Active after a failed Activate", "server", s.srv.addr, "key_id", newID, "err", oneLine(derr))
				}
			} else {
				p.log.Warn("key created but not activated; left Pre-Active", "server", s.srv.addr, "key_id", newID)
			}
			return fmt.Errorf("activate %q: %w", newID, err)
		}
		p.tag(ctx, s, newID, name)
		id = newID
		return nil
	})
	if err != nil {
		return "", err
	}
	p.log.Info("kms key created", "key_id", id, "name", name)
	return id, nil
}

// tag adds the x-* attributes. A refusal is logged, not returned: they are
// informational. PyKMIP does not implement Add Attribute (it answers
// "Invalid Message", as it cannot even parse the request); such a server
// is remembered and not asked again.
func (p *Provider) tag(ctx context.Context, s *session, id, name string) {
	if s.srv.noAddAttribute.Load() {
		return
	}
	tags := [][2]string{{TagVendor, VendorValue}, {TagProduct, ProductValue}}
	if name != "" {
		tags = append(tags, [2]string{TagName, name})
	}
	for _, t := range tags {
		_, err := s.call(ctx, &payloads.AddAttributeRequestPayload{
			UniqueIdentifier: id,
			Attribute:        kmip.Attribute{AttributeName: kmip.AttributeName(t[0]), AttributeValue: t[1]},
		})
		if err == nil {
			continue
		}
		var te *transportError
		if errors.As(err, &te) {
			// The key is created and active; losing the tags is not worth
			// failing (and re-creating) it.
			p.log.Warn("could not tag key: connection lost", "server", s.srv.addr, "key_id", id, "err", oneLine(err))
			return
		}
		var ke *kmipError
		if errors.As(err, &ke) && (ke.Reason == kmip.ResultReasonOperationNotSupported ||
			ke.Reason == kmip.ResultReasonInvalidMessage || ke.Reason == kmip.ResultReasonFeatureNotSupported) {
			if !s.srv.noAddAttribute.Swap(true) {
				p.log.Info("server does not support Add Attribute; keys it creates are not tagged", "server", s.srv.addr, "err", oneLine(err))
			}
			return
		}
		p.log.Info("server refused a key tag", "server", s.srv.addr, "key_id", id, "tag", t[0], "err", oneLine(err))
	}
}

// GetKey fetches key id and checks that it is an Active 256-bit AES
// symmetric key. The returned slice is the only copy this package keeps a
// reference to; the caller must zero it after use.
func (p *Provider) GetKey(ctx context.Context, id string) ([]byte, error) {
	key, _, err := p.getKey(ctx, id, stateError)
	return key, err
}

// FetchKEK is GetKeyState with the state spelled as KMIP names it
// ("Active", "Deactivated", "Compromised"): the engine's keyring uses it
// to keep the state with the KEK (keys.KeyStateServer).
func (p *Provider) FetchKEK(ctx context.Context, id string) ([]byte, string, error) {
	key, st, err := p.GetKeyState(ctx, id)
	if err != nil {
		return nil, "", err
	}
	return key, st.String(), nil
}

// GetKeyState fetches key id, a 256-bit AES symmetric key, with its
// life-cycle state. It returns the key material for an Active,
// Deactivated or Compromised key (the last two may only unwrap: the caller
// must not protect new data with them) and an error naming the state for
// every other (Pre-Active, Destroyed, Destroyed Compromised). The caller
// owns and must zero the returned slice.
func (p *Provider) GetKeyState(ctx context.Context, id string) ([]byte, KeyState, error) {
	return p.getKey(ctx, id, unwrapStateError)
}

// getKey fetches key id and its state; allowed refuses the states the
// caller may not use (stateError or unwrapStateError).
func (p *Provider) getKey(ctx context.Context, id string, allowed func(KeyState) error) ([]byte, KeyState, error) {
	var key []byte
	var state KeyState
	err := p.run(ctx, fmt.Sprintf("get key %q", id), func(ctx context.Context, s *session) error {
		resp, err := s.call(ctx, &payloads.GetRequestPayload{UniqueIdentifier: id})
		if err != nil {
			return p.explain(ctx, s, id, err)
		}
		gr, ok := resp.(*payloads.GetResponsePayload)
		if !ok {
			return cause(ErrServer, fmt.Sprintf("unexpected Get response %T", resp), nil)
		}
		k, err := symmetricKey(gr)
		if err != nil {
			return err
		}
		st, err := p.state(ctx, s, id)
		if err != nil {
			clear(k)
			return err
		}
		if err := allowed(st); err != nil {
			clear(k)
			return err
		}
		key, state = k, st
		return nil
	})
	if err != nil {
		return nil, StateUnknown, err
	}
	return key, state, nil
}

// symmetricKey extracts and validates the key material.
func symmetricKey(gr *payloads.GetResponsePayload) ([]byte, error) {
	if gr.ObjectType != kmip.ObjectTypeSymmetricKey {
		return nil, cause(ErrWrongKey, fmt.Sprintf("object type %s, want SymmetricKey", ttlv.EnumStr(gr.ObjectType)), nil)
	}
	sk, ok := gr.Object.(*kmip.SymmetricKey)
	if !ok {
		return nil, cause(ErrWrongKey, fmt.Sprintf("object is %T", gr.Object), nil)
	}
	kb := &sk.KeyBlock
	if kb.KeyWrappingData != nil {
		return nil, cause(ErrWrongKey, "key is returned wrapped; wrapped keys are not supported", nil)
	}
	if alg := kb.CryptographicAlgorithm; alg != 0 && alg != kmip.CryptographicAlgorithmAES {
		return nil, cause(ErrWrongKey, fmt.Sprintf("algorithm %s, want AES", ttlv.EnumStr(alg)), nil)
	}
	k, err := sk.KeyMaterial()
	if err != nil {
		return nil, cause(ErrWrongKey, "no usable key material", err)
	}
	if len(k) != KEKBits/8 {
		n := len(k)
		clear(k)
		return nil, cause(ErrWrongKey, fmt.Sprintf("key is %d bits, want %d", n*8, KEKBits), nil)
	}
	if l := kb.CryptographicLength; l != 0 && l != KEKBits {
		clear(k)
		return nil, cause(ErrWrongKey, fmt.Sprintf("cryptographic length %d, want %d", l, KEKBits), nil)
	}
	return k, nil
}

// explain turns a failed Get into the clearest cause: not found as such,
// otherwise the object state if the server will tell it (a destroyed or
// revoked key may be refused by Get on some servers).
func (p *Provider) explain(ctx context.Context, s *session, id string, getErr error) error {
	var ke *kmipError
	if !errors.As(getErr, &ke) {
		return getErr
	}
	if ke.Reason == kmip.ResultReasonItemNotFound {
		return cause(ErrNotFound, "", getErr)
	}
	if st, err := p.state(ctx, s, id); err == nil {
		if serr := stateError(st); serr != nil {
			return serr
		}
	}
	return getErr
}

// state asks for the State attribute over an existing session.
func (p *Provider) state(ctx context.Context, s *session, id string) (KeyState, error) {
	resp, err := s.call(ctx, &payloads.GetAttributesRequestPayload{
		UniqueIdentifier: id,
		AttributeName:    []kmip.AttributeName{kmip.AttributeNameState},
	})
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return StateUnknown, cause(ErrNotFound, "", err)
		}
		return StateUnknown, err
	}
	ga, ok := resp.(*payloads.GetAttributesResponsePayload)
	if !ok {
		return StateUnknown, cause(ErrServer, fmt.Sprintf("unexpected Get Attributes response %T", resp), nil)
	}
	for _, a := range ga.Attribute {
		if a.AttributeName != kmip.AttributeNameState {
			continue
		}
		if st, ok := a.AttributeValue.(kmip.State); ok {
			return stateFromKMIP(st), nil
		}
	}
	return StateUnknown, cause(ErrServer, "server did not return the State attribute", nil)
}

// KeyState returns the life-cycle state of key id.
func (p *Provider) KeyState(ctx context.Context, id string) (KeyState, error) {
	var st KeyState
	err := p.run(ctx, fmt.Sprintf("get state of key %q", id), func(ctx context.Context, s *session) error {
		var err error
		st, err = p.state(ctx, s, id)
		return err
	})
	return st, err
}

// Locate returns the ids of the symmetric keys whose KMIP Name is name, in
// whatever state (check KeyState before relying on one). The order is the
// server's.
func (p *Provider) Locate(ctx context.Context, name string) ([]string, error) {
	var ids []string
	err := p.run(ctx, fmt.Sprintf("locate key %q", name), func(ctx context.Context, s *session) error {
		resp, err := s.call(ctx, &payloads.LocateRequestPayload{Attribute: []kmip.Attribute{
			{AttributeName: kmip.AttributeNameObjectType, AttributeValue: kmip.ObjectTypeSymmetricKey},
			{AttributeName: kmip.AttributeNameName, AttributeValue: kmip.Name{NameValue: name, NameType: kmip.NameTypeUninterpretedTextString}},
		}})
		if err != nil {
			return err
		}
		lr, ok := resp.(*payloads.LocateResponsePayload)
		if !ok {
			return cause(ErrServer, fmt.Sprintf("unexpected Locate response %T", resp), nil)
		}
		ids = append([]string(nil), lr.UniqueIdentifier...)
		return nil
	})
	return ids, err
}

// Revoke revokes key id: it becomes Deactivated, or Compromised for
// RevokeKeyCompromise, and GetKey refuses it from then on.
func (p *Provider) Revoke(ctx context.Context, id string, reason RevocationReason) error {
	code, err := reason.code()
	if err != nil {
		return &Error{Provider: p.cfg.Name, Op: fmt.Sprintf("revoke key %q", id), Err: err}
	}
	return p.run(ctx, fmt.Sprintf("revoke key %q", id), func(ctx context.Context, s *session) error {
		return p.revoke(ctx, s, id, code, reason)
	})
}

func (p *Provider) revoke(ctx context.Context, s *session, id string, code kmip.RevocationReasonCode, reason RevocationReason) error {
	req := &payloads.RevokeRequestPayload{
		UniqueIdentifier: id,
		RevocationReason: kmip.RevocationReason{RevocationReasonCode: code, RevocationMessage: "vmcryptd: " + strings.ReplaceAll(string(reason), "-", " ")},
	}
	if code == kmip.RevocationReasonCodeKeyCompromise {
		// KMIP requires the compromise date for this reason; "now" is the
		// conservative answer when the operator does not know better.
		now := time.Now().UTC().Truncate(time.Second)
		req.CompromiseOccurrenceDate = &now
	}
	_, err := s.call(ctx, req)
	if errors.Is(err, ErrNotFound) {
		return cause(ErrNotFound, "", err)
	}
	return err
}

// Destroy destroys key id, revoking it first if it is Active (servers
// refuse to destroy an Active key). Destroying a key that is already in a
// Destroyed state succeeds; servers that delete destroyed objects outright
// (PyKMIP) report ErrNotFound for it instead.
func (p *Provider) Destroy(ctx context.Context, id string) error {
	return p.run(ctx, fmt.Sprintf("destroy key %q", id), func(ctx context.Context, s *session) error {
		st, err := p.state(ctx, s, id)
		if err != nil {
			return err
		}
		switch st {
		case StateDestroyed, StateDestroyedCompromised:
			return nil
		case StateActive:
			if err := p.revoke(ctx, s, id, kmip.RevocationReasonCodeCessationOfOperation, RevokeCessationOfOperation); err != nil {
				return fmt.Errorf("revoke before destroy: %w", err)
			}
		}
		_, err = s.call(ctx, &payloads.DestroyRequestPayload{UniqueIdentifier: id})
		if errors.Is(err, ErrNotFound) {
			return cause(ErrNotFound, "", err)
		}
		if err == nil {
			p.log.Info("kms key destroyed", "key_id", id)
		}
		return err
	})
}

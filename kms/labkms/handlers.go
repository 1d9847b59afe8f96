package labkms

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/kmipserver"
	"github.com/ovh/kmip-go/payloads"
	"github.com/ovh/kmip-go/ttlv"
)

// VendorIdentification is what Query (Server Information) reports.
const VendorIdentification = "vmcryptd lab KMS"

// serverManaged attributes are set by the server only; clients may read
// them but not add, modify or delete them. The time-window attributes
// (Process Start, Protect Stop, Deactivation Date...) are here too because
// the lab KMS would store but not enforce them, which would mislead.
var serverManaged = map[kmip.AttributeName]bool{
	kmip.AttributeNameUniqueIdentifier:         true,
	kmip.AttributeNameObjectType:               true,
	kmip.AttributeNameCryptographicAlgorithm:   true,
	kmip.AttributeNameCryptographicLength:      true,
	kmip.AttributeNameState:                    true,
	kmip.AttributeNameInitialDate:              true,
	kmip.AttributeNameActivationDate:           true,
	kmip.AttributeNameProcessStartDate:         true,
	kmip.AttributeNameProtectStopDate:          true,
	kmip.AttributeNameDeactivationDate:         true,
	kmip.AttributeNameDestroyDate:              true,
	kmip.AttributeNameCompromiseOccurrenceDate: true,
	kmip.AttributeNameCompromiseDate:           true,
	kmip.AttributeNameRevocationReason:         true,
	kmip.AttributeNameArchiveDate:              true,
	kmip.AttributeNameLastChangeDate:           true,
	kmip.AttributeNameLeaseTime:                true,
	kmip.AttributeNameUsageLimits:              true,
	kmip.AttributeNameDigest:                   true,
	kmip.AttributeNameFresh:                    true,
	kmip.AttributeNameKeyValuePresent:          true,
	kmip.AttributeNameKeyValueLocation:         true,
	kmip.AttributeNameOriginalCreationDate:     true,
	kmip.AttributeNameAlwaysSensitive:          true,
	kmip.AttributeNameNeverExtractable:         true,
}

// multiInstance attributes may occur several times on one object (KMIP
// 1.4, section 3); every other attribute has at most one instance.
var multiInstance = map[kmip.AttributeName]bool{
	kmip.AttributeNameName:                           true,
	kmip.AttributeNameObjectGroup:                    true,
	kmip.AttributeNameCryptographicParameters:        true,
	kmip.AttributeNameCryptographicDomainParameters:  true,
	kmip.AttributeNameLink:                           true,
	kmip.AttributeNameApplicationSpecificInformation: true,
	kmip.AttributeNameAlternativeName:                true,
}

func isMulti(name kmip.AttributeName) bool { return multiInstance[name] || name.IsCustom() }

// handler implements the KMIP operations over a store.
type handler struct {
	store *store
	log   *slog.Logger
}

func (h *handler) executor() *kmipserver.BatchExecutor {
	exec := kmipserver.NewBatchExecutor()
	// Discover Versions is answered by the executor itself (KMIP 1.4 down
	// to 1.0, the client's preference order respected).
	exec.Route(kmip.OperationQuery, kmipserver.HandleFunc(h.query))
	exec.Route(kmip.OperationCreate, kmipserver.HandleFunc(h.create))
	exec.Route(kmip.OperationRegister, kmipserver.HandleFunc(h.register))
	exec.Route(kmip.OperationActivate, kmipserver.HandleFunc(h.activate))
	exec.Route(kmip.OperationGet, kmipserver.HandleFunc(h.get))
	exec.Route(kmip.OperationGetAttributes, kmipserver.HandleFunc(h.getAttributes))
	exec.Route(kmip.OperationGetAttributeList, kmipserver.HandleFunc(h.getAttributeList))
	exec.Route(kmip.OperationLocate, kmipserver.HandleFunc(h.locate))
	exec.Route(kmip.OperationAddAttribute, kmipserver.HandleFunc(h.addAttribute))
	exec.Route(kmip.OperationModifyAttribute, kmipserver.HandleFunc(h.modifyAttribute))
	exec.Route(kmip.OperationDeleteAttribute, kmipserver.HandleFunc(h.deleteAttribute))
	exec.Route(kmip.OperationRevoke, kmipserver.HandleFunc(h.revoke))
	exec.Route(kmip.OperationDestroy, kmipserver.HandleFunc(h.destroy))
	return exec
}

var supportedOperations = []kmip.Operation{
	kmip.OperationCreate, kmip.OperationRegister, kmip.OperationLocate, kmip.OperationGet,
	kmip.OperationGetAttributes, kmip.OperationGetAttributeList, kmip.OperationAddAttribute,
	kmip.OperationModifyAttribute, kmip.OperationDeleteAttribute, kmip.OperationActivate,
	kmip.OperationRevoke, kmip.OperationDestroy, kmip.OperationQuery, kmip.OperationDiscoverVersions,
}

// now is KMIP's notion of time: Date-Time values have one-second precision.
func now() time.Time { return time.Now().UTC().Truncate(time.Second) }

// clientID names the peer for the logs and the object owner: the subject CN
// of its (already verified) certificate.
func clientID(ctx context.Context) string {
	if certs := peerCertificates(ctx); len(certs) > 0 {
		return certs[0].Subject.CommonName
	}
	return ""
}

func objectID(ctx context.Context, id string) (string, error) {
	uid, err := kmipserver.GetIdOrPlaceholder(ctx, id)
	if err != nil {
		return "", kmipserver.Errorf(kmip.ResultReasonMissingData, "no Unique Identifier given and no ID placeholder set")
	}
	return uid, nil
}

// storeErr maps store failures to KMIP results.
func (h *handler) storeErr(op, uid string, err error) error {
	var ke kmipserver.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ke):
		return err
	case errors.Is(err, errNoObject):
		return kmipserver.Errorf(kmip.ResultReasonItemNotFound, "no object with Unique Identifier %q", uid)
	}
	h.log.Error("lab kms storage failure", "op", op, "uid", uid, "err", err)
	return kmipserver.Errorf(kmip.ResultReasonGeneralFailure, "storage failure: %v", err)
}

func newUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40 // UUID version 4
	b[8] = b[8]&0x3f | 0x80 // RFC 4122 variant
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func newObject(ctx context.Context, alg kmip.CryptographicAlgorithm, bits int32) *object {
	t := now()
	uid := newUID()
	return &object{
		uid:   uid,
		owner: clientID(ctx),
		attrs: []kmip.Attribute{
			{AttributeName: kmip.AttributeNameUniqueIdentifier, AttributeValue: uid},
			{AttributeName: kmip.AttributeNameObjectType, AttributeValue: kmip.ObjectTypeSymmetricKey},
			{AttributeName: kmip.AttributeNameCryptographicAlgorithm, AttributeValue: alg},
			{AttributeName: kmip.AttributeNameCryptographicLength, AttributeValue: bits},
			{AttributeName: kmip.AttributeNameState, AttributeValue: kmip.StatePreActive},
			{AttributeName: kmip.AttributeNameInitialDate, AttributeValue: t},
			{AttributeName: kmip.AttributeNameLastChangeDate, AttributeValue: t},
		},
	}
}

// checkClientAttr refuses attributes a client may not set.
func checkClientAttr(a kmip.Attribute) error {
	name := a.AttributeName
	if serverManaged[name] {
		return kmipserver.Errorf(kmip.ResultReasonPermissionDenied, "attribute %q is managed by the server", name)
	}
	if !name.IsCustom() && !slices.Contains(kmip.AllAttributeNames, name) {
		return kmipserver.Errorf(kmip.ResultReasonInvalidField, "unknown attribute %q", name)
	}
	if a.AttributeValue == nil {
		return kmipserver.Errorf(kmip.ResultReasonInvalidField, "attribute %q has no value", name)
	}
	if why := badValue(a); why != "" {
		return kmipserver.Errorf(kmip.ResultReasonInvalidField, "attribute %q: %s", name, why)
	}
	return nil
}

// badValue says why the store must not keep attribute a, or "". Whatever
// the store keeps must load again at the next start: the value has to come
// back from the store's encoding (KMIP JSON) as it went in. A zero
// Cryptographic Usage Mask (PyKMIP's register() without masks) does not:
// it is written as "" and read back as an error, which once kept the
// whole store from loading.
func badValue(a kmip.Attribute) string {
	if m, ok := a.AttributeValue.(kmip.CryptographicUsageMask); ok && m == 0 {
		return "a usage mask of 0 permits no use"
	}
	in := kmip.TemplateAttribute{Attribute: []kmip.Attribute{{AttributeName: a.AttributeName, AttributeValue: a.AttributeValue}}}
	enc := ttlv.MarshalJSON(&in)
	var back kmip.TemplateAttribute
	if err := ttlv.UnmarshalJSON(enc, &back); err != nil {
		return fmt.Sprintf("value cannot be stored (%v)", err)
	}
	if len(back.Attribute) != 1 || !bytes.Equal(ttlv.MarshalJSON(&back), enc) {
		return "value does not read back as written"
	}
	return ""
}

// applyTemplate adds client attributes from a Create/Register template.
func applyTemplate(o *object, attrs []kmip.Attribute) error {
	for _, a := range attrs {
		if err := checkClientAttr(a); err != nil {
			return err
		}
		if !isMulti(a.AttributeName) && len(o.values(a.AttributeName)) > 0 {
			return kmipserver.Errorf(kmip.ResultReasonInvalidField, "single-instance attribute %q given more than once", a.AttributeName)
		}
		o.add(a.AttributeName, a.AttributeValue)
	}
	return nil
}

// splitAlgLength takes Cryptographic Algorithm and Length out of a template.
func splitAlgLength(attrs []kmip.Attribute) (alg kmip.CryptographicAlgorithm, bits int32, rest []kmip.Attribute, err error) {
	for _, a := range attrs {
		switch a.AttributeName {
		case kmip.AttributeNameCryptographicAlgorithm:
			v, ok := a.AttributeValue.(kmip.CryptographicAlgorithm)
			if !ok {
				return 0, 0, nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "bad Cryptographic Algorithm value")
			}
			alg = v
		case kmip.AttributeNameCryptographicLength:
			v, ok := a.AttributeValue.(int32)
			if !ok {
				return 0, 0, nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "bad Cryptographic Length value")
			}
			bits = v
		default:
			rest = append(rest, a)
		}
	}
	return alg, bits, rest, nil
}

func validAESBits(bits int32) bool { return bits == 128 || bits == 192 || bits == 256 }

func (h *handler) create(ctx context.Context, req *payloads.CreateRequestPayload) (*payloads.CreateResponsePayload, error) {
	if req.ObjectType != kmip.ObjectTypeSymmetricKey {
		return nil, kmipserver.Errorf(kmip.ResultReasonFeatureNotSupported, "the lab KMS creates symmetric keys only, not %s", ttlv.EnumStr(req.ObjectType))
	}
	//lint:ignore SA1019 KMIP 1.0-1.2 clients may send template names; the lab KMS refuses them by name
	if len(req.TemplateAttribute.Name) > 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonFeatureNotSupported, "templates are not supported")
	}
	alg, bits, rest, err := splitAlgLength(req.TemplateAttribute.Attribute)
	if err != nil {
		return nil, err
	}
	if alg == 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonMissingData, "Cryptographic Algorithm is required")
	}
	if alg != kmip.CryptographicAlgorithmAES {
		return nil, kmipserver.Errorf(kmip.ResultReasonFeatureNotSupported, "the lab KMS creates AES keys only, not %s", ttlv.EnumStr(alg))
	}
	if !validAESBits(bits) {
		return nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "Cryptographic Length %d is not 128, 192 or 256", bits)
	}
	o := newObject(ctx, alg, bits)
	if err := applyTemplate(o, rest); err != nil {
		return nil, err
	}
	key := make([]byte, bits/8)
	defer clear(key)
	if _, err := rand.Read(key); err != nil {
		return nil, kmipserver.Errorf(kmip.ResultReasonCryptographicFailure, "random generator failed")
	}
	if err := h.store.insert(o, key); err != nil {
		return nil, h.storeErr("create", o.uid, err)
	}
	kmipserver.SetIdPlaceholder(ctx, o.uid)
	h.log.Info("lab kms: key created", "uid", o.uid, "bits", bits, "client", o.owner)
	return &payloads.CreateResponsePayload{ObjectType: kmip.ObjectTypeSymmetricKey, UniqueIdentifier: o.uid}, nil
}

func (h *handler) register(ctx context.Context, req *payloads.RegisterRequestPayload) (*payloads.RegisterResponsePayload, error) {
	if req.ObjectType != kmip.ObjectTypeSymmetricKey {
		return nil, kmipserver.Errorf(kmip.ResultReasonFeatureNotSupported, "the lab KMS registers symmetric keys only, not %s", ttlv.EnumStr(req.ObjectType))
	}
	//lint:ignore SA1019 KMIP 1.0-1.2 clients may send template names; the lab KMS refuses them by name
	if len(req.TemplateAttribute.Name) > 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonFeatureNotSupported, "templates are not supported")
	}
	sk, ok := req.Object.(*kmip.SymmetricKey)
	if !ok || sk == nil {
		return nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "object is not a symmetric key")
	}
	kb := &sk.KeyBlock
	if kb.KeyWrappingData != nil {
		return nil, kmipserver.Errorf(kmip.ResultReasonFeatureNotSupported, "wrapped key material is not supported")
	}
	if kb.KeyCompressionType != 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonKeyCompressionTypeNotSupported, "key compression is not supported")
	}
	material, err := sk.KeyMaterial()
	if err != nil {
		return nil, kmipserver.Errorf(kmip.ResultReasonKeyFormatTypeNotSupported, "key material: %v", err)
	}
	// The request buffer is garbage anyway; do not keep a plain copy around
	// longer than needed.
	defer clear(material)
	if len(material) == 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "empty key material")
	}
	alg, bits, rest, err := splitAlgLength(req.TemplateAttribute.Attribute)
	if err != nil {
		return nil, err
	}
	if kb.CryptographicAlgorithm != 0 {
		if alg != 0 && alg != kb.CryptographicAlgorithm {
			return nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "Cryptographic Algorithm in template and key block differ")
		}
		alg = kb.CryptographicAlgorithm
	}
	if alg == 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonMissingData, "Cryptographic Algorithm is required")
	}
	actual := int32(len(material) * 8)
	for _, l := range []int32{bits, kb.CryptographicLength} {
		if l != 0 && l != actual {
			return nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "Cryptographic Length %d does not match %d-bit key material", l, actual)
		}
	}
	if alg == kmip.CryptographicAlgorithmAES && !validAESBits(actual) {
		return nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "AES key of %d bits", actual)
	}
	o := newObject(ctx, alg, actual)
	if err := applyTemplate(o, rest); err != nil {
		return nil, err
	}
	if err := h.store.insert(o, material); err != nil {
		return nil, h.storeErr("register", o.uid, err)
	}
	kmipserver.SetIdPlaceholder(ctx, o.uid)
	h.log.Info("lab kms: key registered", "uid", o.uid, "bits", actual, "client", o.owner)
	return &payloads.RegisterResponsePayload{UniqueIdentifier: o.uid}, nil
}

func (h *handler) activate(ctx context.Context, req *payloads.ActivateRequestPayload) (*payloads.ActivateResponsePayload, error) {
	uid, err := objectID(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	err = h.store.update(uid, func(o *object) error {
		if st := o.state(); st != kmip.StatePreActive {
			return kmipserver.Errorf(kmip.ResultReasonPermissionDenied, "object is %s, only a PreActive object can be activated", ttlv.EnumStr(st))
		}
		t := now()
		o.set(kmip.AttributeNameState, kmip.StateActive)
		o.set(kmip.AttributeNameActivationDate, t)
		o.touch(t)
		return nil
	})
	if err != nil {
		return nil, h.storeErr("activate", uid, err)
	}
	h.log.Info("lab kms: key activated", "uid", uid, "client", clientID(ctx))
	return &payloads.ActivateResponsePayload{UniqueIdentifier: uid}, nil
}

func (h *handler) get(ctx context.Context, req *payloads.GetRequestPayload) (*payloads.GetResponsePayload, error) {
	uid, err := objectID(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	if req.KeyCompressionType != 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonKeyCompressionTypeNotSupported, "key compression is not supported")
	}
	if req.KeyWrappingSpecification != nil || req.KeyWrapType != 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonFeatureNotSupported, "key wrapping is not supported")
	}
	format := req.KeyFormatType
	if format == 0 {
		format = kmip.KeyFormatTypeRaw
	}
	if format != kmip.KeyFormatTypeRaw && format != kmip.KeyFormatTypeTransparentSymmetricKey {
		return nil, kmipserver.Errorf(kmip.ResultReasonKeyFormatTypeNotSupported, "key format %s is not supported (Raw or TransparentSymmetricKey)", ttlv.EnumStr(format))
	}
	var (
		key  []byte
		alg  kmip.CryptographicAlgorithm
		bits int32
	)
	err = h.store.view(uid, func(o *object) error {
		if o.sealed == nil {
			return kmipserver.Errorf(kmip.ResultReasonIllegalOperation, "object is %s: its key material no longer exists", ttlv.EnumStr(o.state()))
		}
		v, _ := o.value(kmip.AttributeNameCryptographicAlgorithm)
		alg, _ = v.(kmip.CryptographicAlgorithm)
		v, _ = o.value(kmip.AttributeNameCryptographicLength)
		bits, _ = v.(int32)
		var err error
		key, err = h.store.unseal(o)
		return err
	})
	if err != nil {
		return nil, h.storeErr("get", uid, err)
	}
	// The response owns key from here on; the encoder copies it into the
	// wire buffer and the garbage collector reclaims it. kmipserver gives
	// no hook to wipe it after sending.
	var material kmip.KeyMaterial
	if format == kmip.KeyFormatTypeRaw {
		material.Bytes = &key
	} else {
		material.TransparentSymmetricKey = &kmip.TransparentSymmetricKey{Key: key}
	}
	h.log.Info("lab kms: key retrieved", "uid", uid, "client", clientID(ctx))
	return &payloads.GetResponsePayload{
		ObjectType:       kmip.ObjectTypeSymmetricKey,
		UniqueIdentifier: uid,
		Object: &kmip.SymmetricKey{KeyBlock: kmip.KeyBlock{
			KeyFormatType:          format,
			KeyValue:               &kmip.KeyValue{Plain: &kmip.PlainKeyValue{KeyMaterial: material}},
			CryptographicAlgorithm: alg,
			CryptographicLength:    bits,
		}},
	}, nil
}

func (h *handler) revoke(ctx context.Context, req *payloads.RevokeRequestPayload) (*payloads.RevokeResponsePayload, error) {
	uid, err := objectID(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	code := req.RevocationReason.RevocationReasonCode
	if code == 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonMissingData, "Revocation Reason Code is required")
	}
	compromise := code == kmip.RevocationReasonCodeKeyCompromise || code == kmip.RevocationReasonCodeCACompromise
	var from, to kmip.State
	err = h.store.update(uid, func(o *object) error {
		t := now()
		from = o.state()
		switch {
		case from == kmip.StateDestroyed || from == kmip.StateDestroyedCompromised:
			return kmipserver.Errorf(kmip.ResultReasonIllegalOperation, "object is %s", ttlv.EnumStr(from))
		case compromise:
			// Pre-Active, Active and Deactivated objects all become
			// Compromised (KMIP 1.4 section 4.20).
			occurred := t
			if req.CompromiseOccurrenceDate != nil {
				occurred = req.CompromiseOccurrenceDate.UTC().Truncate(time.Second)
			}
			o.set(kmip.AttributeNameState, kmip.StateCompromised)
			o.set(kmip.AttributeNameCompromiseDate, t)
			o.set(kmip.AttributeNameCompromiseOccurrenceDate, occurred)
		case from == kmip.StatePreActive || from == kmip.StateActive:
			o.set(kmip.AttributeNameState, kmip.StateDeactivated)
			o.set(kmip.AttributeNameDeactivationDate, t)
		default:
			// Already Deactivated or Compromised: revoking again only
			// updates the recorded reason.
		}
		o.set(kmip.AttributeNameRevocationReason, req.RevocationReason)
		o.touch(t)
		to = o.state()
		return nil
	})
	if err != nil {
		return nil, h.storeErr("revoke", uid, err)
	}
	h.log.Info("lab kms: key revoked", "uid", uid, "reason", ttlv.EnumStr(code), "from", ttlv.EnumStr(from), "to", ttlv.EnumStr(to), "client", clientID(ctx))
	return &payloads.RevokeResponsePayload{UniqueIdentifier: uid}, nil
}

func (h *handler) destroy(ctx context.Context, req *payloads.DestroyRequestPayload) (*payloads.DestroyResponsePayload, error) {
	uid, err := objectID(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	err = h.store.update(uid, func(o *object) error {
		switch st := o.state(); st {
		case kmip.StateActive:
			return kmipserver.Errorf(kmip.ResultReasonPermissionDenied, "object is Active; revoke it before destroying it")
		case kmip.StateDestroyed, kmip.StateDestroyedCompromised:
			return kmipserver.Errorf(kmip.ResultReasonIllegalOperation, "object is already %s", ttlv.EnumStr(st))
		case kmip.StateCompromised:
			o.set(kmip.AttributeNameState, kmip.StateDestroyedCompromised)
		default: // Pre-Active, Deactivated
			o.set(kmip.AttributeNameState, kmip.StateDestroyed)
		}
		t := now()
		o.set(kmip.AttributeNameDestroyDate, t)
		o.touch(t)
		// The metadata stays (KMIP keeps destroyed objects' attributes);
		// the sealed material goes.
		o.sealed = nil
		return nil
	})
	if err != nil {
		return nil, h.storeErr("destroy", uid, err)
	}
	h.log.Info("lab kms: key destroyed", "uid", uid, "client", clientID(ctx))
	return &payloads.DestroyResponsePayload{UniqueIdentifier: uid}, nil
}

func (h *handler) query(ctx context.Context, req *payloads.QueryRequestPayload) (*payloads.QueryResponsePayload, error) {
	resp := &payloads.QueryResponsePayload{}
	for _, fn := range req.QueryFunction {
		switch fn {
		case kmip.QueryFunctionOperations:
			resp.Operations = slices.Clone(supportedOperations)
		case kmip.QueryFunctionObjects:
			resp.ObjectType = []kmip.ObjectType{kmip.ObjectTypeSymmetricKey}
		case kmip.QueryFunctionServerInformation:
			resp.VendorIdentification = VendorIdentification
		}
	}
	return resp, nil
}

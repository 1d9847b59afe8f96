package labkms

import (
	"bytes"
	"context"
	"slices"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/kmipserver"
	"github.com/ovh/kmip-go/payloads"
	"github.com/ovh/kmip-go/ttlv"
)

// Attribute operations of the lab KMS: get, list, locate, add, modify,
// delete.

// withIndex returns a with its Attribute Index set when it is not the first
// instance (index 0 may be omitted in KMIP 1.x).
func withIndex(a kmip.Attribute, idx int32) kmip.Attribute {
	a.AttributeIndex = nil
	if idx > 0 {
		i := idx
		a.AttributeIndex = &i
	}
	return a
}

// indexed returns the object's attributes with their per-name indexes.
func indexed(o *object, filter []kmip.AttributeName) []kmip.Attribute {
	count := map[kmip.AttributeName]int32{}
	var all []kmip.Attribute
	for _, a := range o.attrs {
		all = append(all, withIndex(a, count[a.AttributeName]))
		count[a.AttributeName]++
	}
	if len(filter) == 0 {
		return all
	}
	var out []kmip.Attribute
	for _, name := range filter {
		for _, a := range all {
			if a.AttributeName == name {
				out = append(out, a)
			}
		}
	}
	return out
}

func (h *handler) getAttributes(ctx context.Context, req *payloads.GetAttributesRequestPayload) (*payloads.GetAttributesResponsePayload, error) {
	uid, err := objectID(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	var attrs []kmip.Attribute
	err = h.store.view(uid, func(o *object) error {
		attrs = indexed(o, slices.Compact(slices.Clone(req.AttributeName)))
		return nil
	})
	if err != nil {
		return nil, h.storeErr("get attributes", uid, err)
	}
	return &payloads.GetAttributesResponsePayload{UniqueIdentifier: uid, Attribute: attrs}, nil
}

func (h *handler) getAttributeList(ctx context.Context, req *payloads.GetAttributeListRequestPayload) (*payloads.GetAttributeListResponsePayload, error) {
	uid, err := objectID(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	var names []kmip.AttributeName
	err = h.store.view(uid, func(o *object) error {
		for _, a := range o.attrs {
			if !slices.Contains(names, a.AttributeName) {
				names = append(names, a.AttributeName)
			}
		}
		return nil
	})
	if err != nil {
		return nil, h.storeErr("get attribute list", uid, err)
	}
	return &payloads.GetAttributeListResponsePayload{UniqueIdentifier: uid, AttributeName: names}, nil
}

// encodedValue is the TTLV encoding of an attribute value, used to compare
// values of any type (structures, enums, custom x-* values) exactly.
func encodedValue(v any) []byte {
	return ttlv.MarshalTTLV(&kmip.TemplateAttribute{Attribute: []kmip.Attribute{{AttributeName: "v", AttributeValue: v}}})
}

// matches reports whether o satisfies one Locate filter attribute.
func matches(o *object, f kmip.Attribute) bool {
	if f.AttributeName == kmip.AttributeNameCryptographicUsageMask {
		// A usage mask filter selects objects allowing at least those uses.
		want, ok := f.AttributeValue.(kmip.CryptographicUsageMask)
		if !ok {
			return false
		}
		for _, v := range o.values(f.AttributeName) {
			if have, ok := v.(kmip.CryptographicUsageMask); ok && have&want == want {
				return true
			}
		}
		return false
	}
	want := encodedValue(f.AttributeValue)
	for _, v := range o.values(f.AttributeName) {
		if bytes.Equal(encodedValue(v), want) {
			return true
		}
	}
	return false
}

func (h *handler) locate(ctx context.Context, req *payloads.LocateRequestPayload) (*payloads.LocateResponsePayload, error) {
	if req.MaximumItems < 0 || req.OffsetItems < 0 {
		return nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "negative Maximum Items or Offset Items")
	}
	// Every object is on-line; a mask that excludes on-line storage finds
	// nothing.
	if m := req.StorageStatusMask; m != 0 && m&kmip.StorageStatusOnlineStorage == 0 {
		return &payloads.LocateResponsePayload{LocatedItems: new(int32)}, nil
	}
	var found []string
	h.store.each(func(o *object) {
		for _, f := range req.Attribute {
			if !matches(o, f) {
				return
			}
		}
		found = append(found, o.uid)
	})
	// Newest first: "the key named X" is most usefully the latest one.
	slices.Reverse(found)
	total := int32(len(found))
	if off := int(req.OffsetItems); off > 0 {
		found = found[min(off, len(found)):]
	}
	if req.MaximumItems > 0 && len(found) > int(req.MaximumItems) {
		found = found[:req.MaximumItems]
	}
	if len(found) == 1 {
		kmipserver.SetIdPlaceholder(ctx, found[0])
	}
	return &payloads.LocateResponsePayload{LocatedItems: &total, UniqueIdentifier: found}, nil
}

func (h *handler) addAttribute(ctx context.Context, req *payloads.AddAttributeRequestPayload) (*payloads.AddAttributeResponsePayload, error) {
	uid, err := objectID(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	a := req.Attribute
	if err := checkClientAttr(a); err != nil {
		return nil, err
	}
	var idx int32
	err = h.store.update(uid, func(o *object) error {
		if !isMulti(a.AttributeName) && len(o.values(a.AttributeName)) > 0 {
			return kmipserver.Errorf(kmip.ResultReasonIllegalOperation, "single-instance attribute %q is already set; use Modify Attribute", a.AttributeName)
		}
		idx = o.add(a.AttributeName, a.AttributeValue)
		o.touch(now())
		return nil
	})
	if err != nil {
		return nil, h.storeErr("add attribute", uid, err)
	}
	return &payloads.AddAttributeResponsePayload{UniqueIdentifier: uid, Attribute: withIndex(a, idx)}, nil
}

func (h *handler) modifyAttribute(ctx context.Context, req *payloads.ModifyAttributeRequestPayload) (*payloads.ModifyAttributeResponsePayload, error) {
	uid, err := objectID(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	a := req.Attribute
	if err := checkClientAttr(a); err != nil {
		return nil, err
	}
	var idx int32
	if a.AttributeIndex != nil {
		idx = *a.AttributeIndex
	}
	err = h.store.update(uid, func(o *object) error {
		pos := o.position(a.AttributeName, idx)
		if pos < 0 {
			return kmipserver.Errorf(kmip.ResultReasonInvalidField, "object has no attribute %q with index %d", a.AttributeName, idx)
		}
		o.attrs[pos].AttributeValue = a.AttributeValue
		o.touch(now())
		return nil
	})
	if err != nil {
		return nil, h.storeErr("modify attribute", uid, err)
	}
	return &payloads.ModifyAttributeResponsePayload{UniqueIdentifier: uid, Attribute: withIndex(a, idx)}, nil
}

func (h *handler) deleteAttribute(ctx context.Context, req *payloads.DeleteAttributeRequestPayload) (*payloads.DeleteAttributeResponsePayload, error) {
	uid, err := objectID(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	name := req.AttributeName
	if serverManaged[name] {
		return nil, kmipserver.Errorf(kmip.ResultReasonPermissionDenied, "attribute %q is managed by the server", name)
	}
	var idx int32
	if req.AttributeIndex != nil {
		idx = *req.AttributeIndex
	}
	var deleted kmip.Attribute
	err = h.store.update(uid, func(o *object) error {
		pos := o.position(name, idx)
		if pos < 0 {
			return kmipserver.Errorf(kmip.ResultReasonInvalidField, "object has no attribute %q with index %d", name, idx)
		}
		deleted = withIndex(o.attrs[pos], idx)
		o.attrs = slices.Delete(o.attrs, pos, pos+1)
		o.touch(now())
		return nil
	})
	if err != nil {
		return nil, h.storeErr("delete attribute", uid, err)
	}
	return &payloads.DeleteAttributeResponsePayload{UniqueIdentifier: uid, Attribute: deleted}, nil
}

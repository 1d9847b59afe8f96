package keys

import (
	"errors"
	"fmt"

	"github.com/vmware/govmomi/crypto"

	"github.com/vmcryptd/vmcryptd/formats/keylocator"
)

// KeySafeEntry is one wrapped copy of a DEK: the KEK that wraps it and the
// locked data. A keySafe holds one entry normally and two while a shallow
// rekey moves a DEK from one KEK to another.
type KeySafeEntry struct {
	KEK    KeyRef
	Scheme string // the MAC-name field; WrapSchemeName for entries we write
	Locked []byte
}

// EncodeKeySafe renders entries as a VMware KeyLocator list of pairs
// (`vmware:key/list/(pair/(fqid/<VMWARE-NULL>/<provider>/<keyid>,<scheme>,<base64>))`),
// the syntax ESXi writes in `encryption.keySafe` and in a VMDK
// descriptor's `encryptionKeys`. govmomi's codec does the escaping.
func EncodeKeySafe(entries []KeySafeEntry) (string, error) {
	if len(entries) == 0 {
		return "", errors.New("keysafe: no entries")
	}
	list := &crypto.KeyLocator{Type: crypto.KeyLocatorTypeList}
	for _, e := range entries {
		if e.KEK.Provider == "" || e.KEK.KeyID == "" {
			return "", errors.New("keysafe: entry without provider or key id")
		}
		if len(e.Locked) == 0 {
			return "", errors.New("keysafe: entry without a wrapped key")
		}
		scheme := e.Scheme
		if scheme == "" {
			scheme = WrapSchemeName
		}
		list.List = append(list.List, &crypto.KeyLocator{
			Type: crypto.KeyLocatorTypePair,
			Pair: &crypto.KeyLocatorPair{
				Locker: &crypto.KeyLocator{
					Type: crypto.KeyLocatorTypeFQID,
					Indirect: &crypto.KeyLocatorIndirect{
						Type: crypto.KeyLocatorTypeFQID,
						// ESXi writes <VMWARE-NULL> here; govmomi turns the empty string into it.
						UniqueID: "",
						FQID:     crypto.KeyLocatorFQIDParams{KeyServerID: e.KEK.Provider, KeyID: e.KEK.KeyID},
					},
				},
				CryptoMAC:      scheme,
				LockedData:     e.Locked,
				LockedDataSize: len(e.Locked),
			},
		})
	}
	s := list.String()
	if s == "" {
		return "", errors.New("keysafe: govmomi could not encode the key locator")
	}
	return s, nil
}

// DecodeKeySafe parses a keySafe string. It accepts a single pair as well
// as a list of pairs; entries whose locker is not an fqid (passphrase,
// LDAP, script lockers from other products) are an error, since vmcryptd
// can only fetch keys from a KMIP provider.
func DecodeKeySafe(s string) ([]KeySafeEntry, error) {
	kl, err := keylocator.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("keysafe: %w", err)
	}
	var pairs []*crypto.KeyLocator
	switch kl.Type {
	case crypto.KeyLocatorTypeList:
		pairs = kl.List
	case crypto.KeyLocatorTypePair:
		pairs = []*crypto.KeyLocator{kl}
	default:
		return nil, fmt.Errorf("keysafe: top-level locator is %q, want list or pair", crypto.KeyLocatorTypeToName(kl.Type))
	}
	if len(pairs) == 0 {
		return nil, errors.New("keysafe: empty list")
	}
	out := make([]KeySafeEntry, 0, len(pairs))
	for i, p := range pairs {
		if p == nil || p.Type != crypto.KeyLocatorTypePair || p.Pair == nil {
			return nil, fmt.Errorf("keysafe: element %d is not a pair", i)
		}
		lk := p.Pair.Locker
		if lk == nil || lk.Type != crypto.KeyLocatorTypeFQID || lk.Indirect == nil {
			name := "none"
			if lk != nil {
				name = crypto.KeyLocatorTypeToName(lk.Type)
			}
			return nil, fmt.Errorf("keysafe: element %d is locked by %q, vmcryptd supports only fqid (KMIP) lockers", i, name)
		}
		fq := lk.Indirect.FQID
		if fq.KeyServerID == "" || fq.KeyID == "" {
			return nil, fmt.Errorf("keysafe: element %d has an empty provider or key id", i)
		}
		// An entry without locked data can unlock nothing; it is damage
		// (FuzzKeySafeDecodeRoundTrip found one that govmomi accepts but
		// cannot write back).
		if len(p.Pair.LockedData) == 0 {
			return nil, fmt.Errorf("keysafe: element %d has no wrapped key", i)
		}
		out = append(out, KeySafeEntry{
			KEK:    KeyRef{Provider: fq.KeyServerID, KeyID: fq.KeyID},
			Scheme: p.Pair.CryptoMAC,
			Locked: p.Pair.LockedData,
		})
	}
	return out, nil
}

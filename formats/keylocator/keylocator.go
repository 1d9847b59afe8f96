// Package keylocator is the one entry point for VMware KeyLocator strings
// (the syntax of a vmx's encryption.keySafe and a VMDK descriptor's
// encryptionKeys) read from untrusted files.
//
// The codec is govmomi's (package crypto). It is third-party code parsing
// attacker-controlled text, so the policy lives here, once: a panic inside
// the codec is an ordinary parse error, never a crash of the caller.
package keylocator

import (
	"fmt"

	"github.com/vmware/govmomi/crypto"
)

// Parse decodes a KeyLocator string. Any failure, including a panic in the
// codec, is returned as an error.
func Parse(s string) (kl *crypto.KeyLocator, err error) {
	defer func() {
		if r := recover(); r != nil {
			kl, err = nil, fmt.Errorf("malformed key locator: %v", r)
		}
	}()
	kl, err = crypto.ImportKeyLocator(s)
	if err != nil {
		return nil, err
	}
	if kl == nil {
		return nil, fmt.Errorf("malformed key locator: empty")
	}
	return kl, nil
}

package daemon

import (
	"fmt"
	"strings"

	"github.com/vmcryptd/vmcryptd/engine/keys"
)

// revokedWarning is the status warning for a VM one of whose KEKs is in
// memory in a revoked state (Deactivated or Compromised), or "".
func revokedWarning(r *keys.Keyring, refs []keys.KeyRef) string {
	var parts []string
	for _, ref := range refs {
		if k, ok := r.Peek(ref); ok && k.Revoked() {
			parts = append(parts, fmt.Sprintf("key %s is %s (revoked)", ref, k.State()))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return strings.Join(parts, "; ") + ": the VM may be decrypted or rekeyed onto an active key, never given new keys or files (the view serves it read-only)"
}

// noteKeyLoaded logs and audits a KEK fetched in a revoked state: it will
// be used to unwrap only.
func (d *Daemon) noteKeyLoaded(ref keys.KeyRef, kek *keys.KEK) {
	if kek == nil || !kek.Revoked() {
		return
	}
	d.log.Warn("key is revoked: loaded to unwrap only", "key", ref.String(), "state", kek.State())
	d.auditWrite(AuditEntry{UID: -1, User: "vmcryptd", Op: "key.load-revoked", Target: ref.Provider,
		KeyIDs: []string{ref.String()}, Result: "ok", Detail: "key is " + kek.State() + ": unwrap only"})
}

package keys

import "fmt"

// ErrLocked is returned for every key request while the keyring is locked
// (vmcryptd lock). It is a key-unavailable error, so views answer EACCES.
var ErrLocked = fmt.Errorf("%w: keys locked by 'vmcryptd lock' (run 'vmcryptd unlock')", ErrKeyUnavailable)

// Lock zeroes every cached KEK at once and refuses every later Get or
// Create with ErrLocked (no key server is asked) until Unlock. A fetch
// running while Lock is called is discarded when it completes. It
// returns how many KEKs were zeroed.
func (r *Keyring) Lock() int {
	r.mu.Lock()
	r.locked = true
	keys := r.keys
	r.keys = map[KeyRef]*KEK{}
	r.mu.Unlock()
	for _, k := range keys {
		k.Destroy() // waits for a wrap or unwrap in progress with it
	}
	return len(keys)
}

// Unlock lets Get fetch keys again; it fetches nothing itself.
func (r *Keyring) Unlock() {
	r.mu.Lock()
	r.locked = false
	r.mu.Unlock()
}

// Locked reports whether Lock is in force.
func (r *Keyring) Locked() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.locked
}

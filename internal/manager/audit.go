package manager

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
)

// auditLog appends one JSON object per line for every host request that
// touches a key or the inventory, every refusal, and every admin change.
// It holds key ids only, never key material.
type auditLog struct {
	mu sync.Mutex
	f  *os.File
}

// AuditEntry is one line of the manager's audit log.
type AuditEntry struct {
	Time      time.Time `json:"time"`
	Host      string    `json:"host,omitempty"` // host channel: the peer's host name (certificate CN)
	UID       *int      `json:"uid,omitempty"`  // admin socket: the caller's uid
	Op        string    `json:"op"`
	VM        string    `json:"vm,omitempty"`
	KeyIDs    []string  `json:"key_ids,omitempty"`
	Privilege string    `json:"privilege"`
	Result    string    `json:"result"` // "ok", "denied", "error"
	Detail    string    `json:"detail,omitempty"`
}

func openAudit(path string) (*auditLog, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	return &auditLog{f: f}, nil
}

// write appends e durably before the answer goes out.
func (a *auditLog) write(e AuditEntry) error {
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, err := a.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	return a.f.Sync()
}

func (a *auditLog) close() error { return a.f.Close() }

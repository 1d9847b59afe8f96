package daemon

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
)

// auditLog appends one JSON object per line for every cryptographic
// operation and every denial. It never holds key material: entries carry
// key ids only.
type auditLog struct {
	mu sync.Mutex
	f  *os.File
}

// AuditEntry is one line of the audit log.
type AuditEntry struct {
	Time   time.Time `json:"time"`
	UID    int       `json:"uid"`
	User   string    `json:"user"`
	Role   string    `json:"role"`
	Op     string    `json:"op"`
	Target string    `json:"target,omitempty"` // VM dir, disk, provider
	KeyIDs []string  `json:"key_ids,omitempty"`
	Result string    `json:"result"` // "ok", "denied", "error"
	Detail string    `json:"detail,omitempty"`
}

func openAudit(path string) (*auditLog, error) {
	// O_APPEND: concurrent writers (and a restarted daemon) only ever add.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	return &auditLog{f: f}, nil
}

func (a *auditLog) write(e AuditEntry) error {
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, err := a.f.Write(b); err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	// Durable before the operation's answer goes out.
	return a.f.Sync()
}

func (a *auditLog) close() error { return a.f.Close() }

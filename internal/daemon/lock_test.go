package daemon

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/internal/config"
)

// A lock while a VM operation runs is refused and changes nothing: the
// operation holds its own copies of keys.
func TestLockRefusedDuringOperation(t *testing.T) {
	dir := t.TempDir()
	cfg := &config.Config{Socket: filepath.Join(dir, "d.sock"), StateDir: filepath.Join(dir, "state"), AuditLog: filepath.Join(dir, "audit.log")}
	d, err := New(Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	rc := &reqCtx{id: identity{UID: 0, User: "root", Role: RoleAdministrator}}
	vm := filepath.Join(dir, "vm1")
	if err := d.vmLocks.acquire(vm, "encrypt"); err != nil {
		t.Fatal(err)
	}
	_, err = d.hLock(rc)
	var he *httpError
	if !errors.As(err, &he) || he.code != http.StatusConflict || !strings.Contains(err.Error(), vm+" (encrypt)") || !strings.Contains(err.Error(), "nothing changed") {
		t.Fatalf("lock during an operation: %v", err)
	}
	if d.keyring.Locked() {
		t.Fatal("refused lock left the keyring locked")
	}
	d.vmLocks.release(vm)
	res, err := d.hLock(rc)
	if err != nil || !d.keyring.Locked() {
		t.Fatalf("lock after the operation: %v", err)
	}
	if lr := res.(lockResult); lr.AlreadyLocked || lr.Views != 0 {
		t.Fatalf("lock result %+v", lr)
	}
	if _, err := d.hUnlock(&reqCtx{id: rc.id, r: (&http.Request{}).WithContext(t.Context())}); err != nil || d.keyring.Locked() {
		t.Fatalf("unlock: %v", err)
	}
}

package daemon

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vmcryptd/vmcryptd/internal/config"
)

// TestInsideDatastores: strictly inside a configured datastore (the root
// itself is not a VM directory), not-yet-existing paths included.
func TestInsideDatastores(t *testing.T) {
	base := t.TempDir()
	ds := filepath.Join(base, "ds")
	if err := os.MkdirAll(filepath.Join(ds, "vm"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := &config.Config{Datastores: []config.Datastore{{Name: "ds", Path: ds}}}
	for _, tc := range []struct {
		cfg  *config.Config
		dir  string
		want bool
	}{
		{cfg, filepath.Join(ds, "vm"), true},
		{cfg, filepath.Join(ds, "new-vm"), true},
		{cfg, ds, false},
		{cfg, filepath.Join(base, "ds2", "vm"), false},
		{cfg, filepath.Join(ds, "..", "x"), false},
		{&config.Config{}, "/anywhere/vm", true},
	} {
		if got := insideDatastores(tc.cfg, tc.dir); got != tc.want {
			t.Errorf("insideDatastores(%s) = %v, want %v", tc.dir, got, tc.want)
		}
	}
}

// TestAcquireVMSeesReload: a VM operation that resolved its directory
// under the old configuration is refused at its registration if a reload
// dropped the datastore meanwhile, and registers while it is configured.
func TestAcquireVMSeesReload(t *testing.T) {
	ds := t.TempDir()
	vm := filepath.Join(ds, "vm")
	if err := os.Mkdir(vm, 0o755); err != nil {
		t.Fatal(err)
	}
	vm, _ = filepath.EvalSymlinks(vm)
	d := daemonWithConfig(&config.Config{Datastores: []config.Datastore{{Name: "ds", Path: ds}}})
	if err := d.acquireVM(vm, "vm.encrypt"); err != nil {
		t.Fatalf("acquire inside a configured datastore: %v", err)
	}
	d.vmLocks.release(vm)
	other := t.TempDir()
	d.conf.Store(&config.Config{Datastores: []config.Datastore{{Name: "other", Path: other}}}) // the reload's commit
	if err := d.acquireVM(vm, "vm.encrypt"); err == nil {
		t.Fatal("acquire after the datastore was dropped succeeded")
	}
	if d.vmLocks.isBusy(vm) {
		t.Fatal("a refused acquire left the VM marked busy")
	}
}

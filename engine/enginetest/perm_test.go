package enginetest

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
)

func TestEncryptedFilePerm(t *testing.T) {
	tests := []struct{ in, want os.FileMode }{
		{0o644, 0o600},
		{0o666, 0o600},
		{0o777, 0o600},
		{0o600, 0o600},
		{0o640, 0o600},
		{0o400, 0o400},
		{0o200, 0o200},
		{0o000, 0o000},
		{0o4755 | os.ModeSetuid, 0o600},
		{0o044, 0o000},
	}
	for _, tt := range tests {
		if got := vm.EncryptedFilePerm(tt.in); got != tt.want {
			t.Errorf("EncryptedFilePerm(%#o) = %#o, want %#o", tt.in, got, tt.want)
		}
	}
}

// TestCreateEncryptedPerms: every file vm create --encrypt makes is 0600
// with the VM directory's owner and group (issue 12.6: the nvram was 0644,
// so an allow_other view let any user read it decrypted); a plain VM keeps
// the usual 0644.
func TestCreateEncryptedPerms(t *testing.T) {
	needTool(t, "qemu-img")
	ops, kek := newTestOps(t)
	ctx := context.Background()
	root := t.TempDir()
	tests := []struct {
		name    string
		encrypt bool
		disks   []vmops.DiskSpec
		maxPerm os.FileMode // no bit outside it
		wantAny os.FileMode // the nvram has exactly these bits
	}{
		{"enc", true, []vmops.DiskSpec{{Size: 8 << 20}, {Size: 8 << 20, Subformat: "monolithicSparse"}, {Size: 8 << 20, Subformat: "twoGbMaxExtentFlat"}}, 0o600, 0o600},
		{"plain", false, []vmops.DiskSpec{{Size: 8 << 20}}, 0o644, 0o644},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(root, tt.name)
			if err := ops.Create(ctx, dir, vmops.CreateSpec{Name: tt.name, Encrypt: tt.encrypt, KEK: kek, Disks: tt.disks}); err != nil {
				t.Fatal(err)
			}
			dst, err := os.Stat(dir)
			if err != nil {
				t.Fatal(err)
			}
			dsys := dst.Sys().(*syscall.Stat_t)
			ents, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			if len(ents) < 4 {
				t.Fatalf("only %d files", len(ents))
			}
			for _, e := range ents {
				st, err := os.Lstat(filepath.Join(dir, e.Name()))
				if err != nil {
					t.Fatal(err)
				}
				if p := st.Mode().Perm(); p&^tt.maxPerm != 0 {
					t.Errorf("%s: mode %#o, want at most %#o", e.Name(), p, tt.maxPerm)
				}
				if filepath.Ext(e.Name()) == ".nvram" && st.Mode().Perm() != tt.wantAny {
					t.Errorf("%s: mode %#o, want %#o", e.Name(), st.Mode().Perm(), tt.wantAny)
				}
				sys := st.Sys().(*syscall.Stat_t)
				if sys.Uid != dsys.Uid || sys.Gid != dsys.Gid {
					t.Errorf("%s: owner %d:%d, VM directory %d:%d", e.Name(), sys.Uid, sys.Gid, dsys.Uid, dsys.Gid)
				}
			}
		})
	}
}

// TestViewCreatePermInEncryptedVM: files the view creates in an encrypted
// VM (a VM-key file and a new disk) are containers of mode 0600 at most,
// whatever mode the creating tool asked for.
func TestViewCreatePermInEncryptedVM(t *testing.T) {
	ops, kek := newTestOps(t)
	ctx := context.Background()
	root := t.TempDir()
	dir := filepath.Join(root, "vm")
	if err := ops.Create(ctx, dir, vmops.CreateSpec{Name: "vm", Encrypt: true, KEK: kek}); err != nil {
		t.Fatal(err)
	}
	ds := view.NewDatastore(root, ops.Keys, view.DatastoreOptions{Impl: ops.Impl})
	defer ds.Close()
	tests := []struct {
		rel  string
		ask  os.FileMode
		want os.FileMode
	}{
		{"vm/vm.vswp", 0o644, 0o600},
		{"vm/vm-1.vmss", 0o666, 0o600},
		{"vm/new.vmdk", 0o644, 0o600},
		{"vm/ro.vmem", 0o444, 0o400},
	}
	for _, tt := range tests {
		c, enc, err := ds.Create(tt.rel, tt.ask)
		if err != nil {
			t.Fatalf("%s: %v", tt.rel, err)
		}
		if !enc {
			t.Fatalf("%s: not created encrypted", tt.rel)
		}
		c.Close()
		st, err := os.Lstat(filepath.Join(root, tt.rel))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != tt.want {
			t.Errorf("%s: asked %#o, got %#o, want %#o", tt.rel, tt.ask, st.Mode().Perm(), tt.want)
		}
	}
}

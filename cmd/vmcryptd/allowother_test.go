package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vmcryptd/vmcryptd/formats/nvram"
)

// TestAllowOtherViewKeepsDecryptedFilesPrivate is issue 12.6: with a view
// mounted --allow-other, a user with no role and outside the socket group
// read the decrypted nvram of a VM made by `vm create --encrypt` (0644).
// Files of an encrypted VM are 0600 now, and the view applies the backing
// file's mode: that user reads a world-readable plain file through the
// same view (so the view is reachable) but none of the VM's files.
func TestAllowOtherViewKeepsDecryptedFilesPrivate(t *testing.T) {
	needView(t)
	needBin(t, "cat")
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	ds := filepath.Join(dir, "datastore")
	// The other user must be able to walk to the view: the test's own
	// directories (not /tmp itself) and the datastore are made 0755.
	for _, p := range []string{filepath.Dir(dir), dir, ds} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	vm := filepath.Join(ds, "permvm")
	mustRun(t, "--socket", sock, "vm", "create", vm, "--name", "permvm", "--encrypt")
	if err := os.WriteFile(filepath.Join(ds, "pub.txt"), []byte("public\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(ds, "pub.txt"), 0o644); err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(dir, "view")
	mustRun(t, "--socket", sock, "mount", "lab", mp, "--allow-other")
	t.Cleanup(func() { vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp) })

	// Root sees the decrypted nvram through the view: it is worth hiding.
	view := filepath.Join(mp, "permvm")
	nv, err := os.ReadFile(filepath.Join(view, "permvm.nvram"))
	if err != nil || !bytes.HasPrefix(nv, []byte(nvram.Magic)) {
		t.Fatalf("root reading the decrypted nvram: %v (%d bytes)", err, len(nv))
	}
	norole := &syscall.Credential{Uid: 65533, Gid: 65533}
	tests := []struct {
		path   string
		wantOK bool
	}{
		{filepath.Join(mp, "pub.txt"), true},
		{filepath.Join(view, "permvm.nvram"), false},
		{filepath.Join(view, "permvm.vmx"), false},
	}
	for _, tt := range tests {
		cmd := exec.Command("cat", tt.path)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: norole}
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		switch {
		case tt.wantOK && err != nil:
			t.Errorf("uid 65533 cat %s: %v: %s (the view is not reachable: the test proves nothing)", tt.path, err, stderr.String())
		case !tt.wantOK && err == nil:
			t.Errorf("uid 65533 read %s through the allow_other view (%d bytes)", tt.path, stdout.Len())
		case !tt.wantOK && !strings.Contains(stderr.String(), "Permission denied"):
			t.Errorf("uid 65533 cat %s: %q, want Permission denied", tt.path, stderr.String())
		}
	}
	// At rest: 0600, owned like the VM directory.
	ents, _ := os.ReadDir(vm)
	for _, e := range ents {
		st, err := os.Lstat(filepath.Join(vm, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s: mode %#o at rest", e.Name(), st.Mode().Perm())
		}
	}
}

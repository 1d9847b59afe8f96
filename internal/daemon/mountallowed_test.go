package daemon

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmcryptd/vmcryptd/internal/config"
)

func TestMountAllowed(t *testing.T) {
	base := t.TempDir()
	roots := filepath.Join(base, "mnt")
	os.MkdirAll(filepath.Join(roots, "existing"), 0o755)
	os.MkdirAll(filepath.Join(base, "etc"), 0o755)
	// A symlink inside the root that leads out of it.
	os.Symlink(filepath.Join(base, "etc"), filepath.Join(roots, "escape"))
	user := identity{UID: 1000, User: "u", Role: "Administrator"}
	with := daemonWithConfig(&config.Config{MountRoots: []string{roots}})
	without := daemonWithConfig(&config.Config{})
	shared := filepath.Join(base, "shared")
	os.Mkdir(shared, 0o755)
	os.Chmod(shared, 0o777)
	open := daemonWithConfig(&config.Config{MountRoots: []string{shared}})
	for _, tc := range []struct {
		name string
		d    *Daemon
		id   identity
		mp   string
		ok   bool
	}{
		{"root anywhere", without, identity{UID: 0}, filepath.Join(base, "etc", "x"), true},
		{"user without roots", without, user, filepath.Join(roots, "v"), false},
		{"user under root, new dir", with, user, filepath.Join(roots, "new"), true},
		{"user deeper than a root's child", with, user, filepath.Join(roots, "existing", "deeper"), false},
		{"user on a symlink child", with, user, filepath.Join(roots, "escape"), false},
		{"user under root, existing dir", with, user, filepath.Join(roots, "existing"), true},
		{"user on the root itself", with, user, roots, false},
		{"user outside", with, user, filepath.Join(base, "etc", "x"), false},
		{"user through a dot-dot", with, user, filepath.Join(roots, "..", "etc"), false},
		{"user through a symlink out", with, user, filepath.Join(roots, "escape", "x"), false},
		{"user under a world-writable root", open, user, filepath.Join(shared, "v"), false},
	} {
		err := tc.d.mountAllowed(tc.id, filepath.Clean(tc.mp))
		if (err == nil) != tc.ok {
			t.Errorf("%s: %v, want ok=%v", tc.name, err, tc.ok)
		}
		var he *httpError
		if err != nil && (!errors.As(err, &he) || (he.code != http.StatusForbidden && he.code != http.StatusBadRequest)) {
			t.Errorf("%s: %v is not a 403 or 400", tc.name, err)
		}
	}
}

func daemonWithConfig(c *config.Config) *Daemon {
	d := &Daemon{}
	d.conf.Store(c)
	return d
}

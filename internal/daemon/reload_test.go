package daemon

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/config"
)

// Every configuration key is classified for reload: a new key must be
// added to configSections, or a change to it would be ignored silently.
func TestConfigSectionsCoverConfig(t *testing.T) {
	var names []string
	rt := reflect.TypeOf(config.Config{})
	for i := 0; i < rt.NumField(); i++ {
		names = append(names, strings.Split(rt.Field(i).Tag.Get("toml"), ",")[0])
	}
	var have []string
	for _, s := range configSections {
		have = append(have, s.name)
	}
	slices.Sort(names)
	slices.Sort(have)
	if !slices.Equal(names, have) {
		t.Fatalf("config keys %v, reload knows %v", names, have)
	}
}

func TestReloadPlan(t *testing.T) {
	base := func() *config.Config {
		uid := 1001
		return &config.Config{Socket: "/run/s", Datastores: []config.Datastore{{Name: "a", Path: "/a"}},
			Roles: []config.RoleBinding{{UID: &uid, Role: RoleReadOnly}}}
	}
	tests := []struct {
		name           string
		change         func(c *config.Config)
		apply, restart []string
	}{
		{"nothing", func(c *config.Config) {}, nil, nil},
		{"role", func(c *config.Config) { c.Roles[0].Role = RoleNoCryptoAdmin }, []string{"roles"}, nil},
		{"same uid, new pointer", func(c *config.Config) { u := 1001; c.Roles[0].UID = &u }, nil, nil},
		{"datastore", func(c *config.Config) { c.Datastores[0].Path = "/b" }, []string{"datastores"}, nil},
		{"metrics and retry", func(c *config.Config) {
			c.MetricsListen = "127.0.0.1:1"
			c.KeyRetryInterval = time.Minute
		}, []string{"key_retry_interval", "metrics_listen"}, nil},
		{"mounts and roots", func(c *config.Config) {
			c.Mounts = []config.Mount{{Datastore: "a", Mountpoint: "/m"}}
			c.MountRoots = []string{"/mnt"}
		}, []string{"mounts", "mount_roots"}, nil},
		{"role and socket", func(c *config.Config) { c.Roles = nil; c.Socket = "/run/t" }, []string{"roles"}, []string{"socket (the API socket is made at start)"}},
		{"core dump patterns", func(c *config.Config) { c.CoreDumpPatterns = []string{"*.dmp"} }, nil,
			[]string{"core_dump_patterns (which files a mounted view decrypts under the host key is fixed when it mounts)"}},
	}
	for _, tt := range tests {
		next := base()
		tt.change(next)
		apply, restart := reloadPlan(base(), next)
		if !slices.Equal(apply, tt.apply) || !slices.Equal(restart, tt.restart) {
			t.Errorf("%s: apply %v restart %v, want %v %v", tt.name, apply, restart, tt.apply, tt.restart)
		}
	}
}

// Reload applies a role change; a broken file or a change that needs a
// restart is refused whole, with the line or the section named, and the
// running roles stay.
func TestReload(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vmcryptd.toml")
	head := `socket = "` + filepath.Join(dir, "d.sock") + `"
state_dir = "` + filepath.Join(dir, "state") + `"
audit_log = "` + filepath.Join(dir, "audit.log") + `"
[[datastores]]
name = "ds"
path = "` + dir + `"
`
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(head + "[[roles]]\nuid = 4242\nrole = \"ReadOnly\"\n")
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(Options{Config: cfg, ConfigPath: path, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.auth.lookup = func(uid int) (string, []string, error) { return "u", nil, nil }
	role := func() string { return d.auth.resolve(4242).Role }
	if role() != RoleReadOnly {
		t.Fatalf("role at start %q", role())
	}
	steps := []struct {
		name     string
		file     string
		wantErr  string // "" for success
		wantRole string
	}{
		{"unchanged", head + "[[roles]]\nuid = 4242\nrole = \"ReadOnly\"\n", "", RoleReadOnly},
		{"role changed", head + "[[roles]]\nuid = 4242\nrole = \"NoCryptoAdmin\"\n", "", RoleNoCryptoAdmin},
		{"syntax error", head + "[[roles]]\nuid = 4242\nrole = ReadOnly\n", "line 9 ", RoleNoCryptoAdmin},
		{"unknown role", head + "[[roles]]\nuid = 4242\nrole = \"Root\"\n", `unknown role "Root"`, RoleNoCryptoAdmin},
		{"unknown key", head + "[[roles]]\nuid = 4242\nrole = \"ReadOnly\"\ncolour = 1\n", `unknown key "roles.colour"`, RoleNoCryptoAdmin},
		{"socket changed too", strings.Replace(head, `d.sock`, `e.sock`, 1) + "[[roles]]\nuid = 4242\nrole = \"ReadOnly\"\n", "changes socket (the API socket is made at start), which this version applies only at start", RoleNoCryptoAdmin},
		{"missing datastore", head + "[[datastores]]\nname = \"gone\"\npath = \"" + filepath.Join(dir, "nope") + "\"\n[[roles]]\nuid = 4242\nrole = \"ReadOnly\"\n", `datastore "gone": stat ` + filepath.Join(dir, "nope"), RoleNoCryptoAdmin},
		{"datastore renamed, role changed", strings.Replace(head, `name = "ds"`, `name = "ds2"`, 1) + "[[roles]]\nuid = 4242\nrole = \"ReadOnly\"\n", "", RoleReadOnly},
		{"role removed", head, "", ""},
	}
	for _, s := range steps {
		write(s.file)
		_, err := d.Reload(context.Background())
		switch {
		case s.wantErr == "" && err != nil:
			t.Errorf("%s: %v", s.name, err)
		case s.wantErr != "" && (err == nil || !strings.Contains(err.Error(), s.wantErr) || !strings.Contains(err.Error(), "running configuration kept")):
			t.Errorf("%s: err %v, want one containing %q", s.name, err, s.wantErr)
		}
		if role() != s.wantRole {
			t.Errorf("%s: role %q, want %q", s.name, role(), s.wantRole)
		}
	}
}

// A reload may not leave a running view or export outside every datastore
// of the new file, including a first [[datastores]] where any path was
// allowed before; the paths compared are those they were set up with.
func TestCheckServedInside(t *testing.T) {
	base := t.TempDir()
	a, b := filepath.Join(base, "a"), filepath.Join(base, "b")
	os.Mkdir(a, 0o700)
	os.Mkdir(b, 0o700)
	d := &Daemon{
		mounts:  map[string]*activeMount{"/mnt/a": {rec: mountRecord{Datastore: a, Mountpoint: "/mnt/a"}}},
		exports: map[string]*activeExport{"/run/x.sock": {rec: exportRecord{Disk: filepath.Join(b, "vm", "d.vmdk")}}},
	}
	for _, tc := range []struct {
		name string
		ds   []config.Datastore
		want string
	}{
		{"no datastores: any path", nil, ""},
		{"both kept", []config.Datastore{{Name: "a", Path: a}, {Name: "b", Path: b}}, ""},
		{"b dropped", []config.Datastore{{Name: "a", Path: a}}, "the NBD export of " + filepath.Join(b, "vm", "d.vmdk")},
		{"first datastores, neither", []config.Datastore{{Name: "c", Path: base + "/c"}}, "the view on /mnt/a"},
		{"parent datastore", []config.Datastore{{Name: "all", Path: base}}, "the NBD export"},
	} {
		err := d.checkServedInside(&config.Config{Datastores: tc.ds})
		switch {
		case tc.name == "parent datastore":
			// a and b are not datastores themselves: a view of a is not
			// the view of a datastore, but its files are inside one.
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
		case tc.want == "" && err != nil, tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: err %v, want %q", tc.name, err, tc.want)
		}
	}
}

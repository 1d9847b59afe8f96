package daemon

import (
	"fmt"
	"reflect"
	"strings"

	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/config"
)

// configSections are the parts of the configuration, by their TOML
// names, and whether a reload can apply a change to them. Everything but
// [[roles]] is wired into running parts (listeners, providers, views,
// paths) that this version builds only at start.
var configSections = []struct {
	name       string
	reloadable bool
	get        func(*config.Config) any
}{
	{"roles", true, func(c *config.Config) any { return c.Roles }},
	{"socket", false, func(c *config.Config) any { return c.Socket }},
	{"socket_group", false, func(c *config.Config) any { return c.SocketGroup }},
	{"state_dir", false, func(c *config.Config) any { return c.StateDir }},
	{"audit_log", false, func(c *config.Config) any { return c.AuditLog }},
	{"default_provider", false, func(c *config.Config) any { return c.DefaultProvider }},
	{"kms", false, func(c *config.Config) any { return c.KMS }},
	{"manager", false, func(c *config.Config) any { return c.Manager }},
	{"datastores", false, func(c *config.Config) any { return c.Datastores }},
	{"mounts", false, func(c *config.Config) any { return c.Mounts }},
	{"core_dump_patterns", false, func(c *config.Config) any { return c.CoreDumpPatterns }},
	{"key_retry_interval", false, func(c *config.Config) any { return c.KeyRetryInterval }},
	{"metrics_listen", false, func(c *config.Config) any { return c.MetricsListen }},
	{"mount_roots", false, func(c *config.Config) any { return c.MountRoots }},
}

// reloadPlan compares the running configuration with a new one: apply
// lists the changed sections a reload can apply, restart those it cannot.
// A reload goes ahead only when restart is empty (all or nothing).
func reloadPlan(running, next *config.Config) (apply, restart []string) {
	for _, s := range configSections {
		if reflect.DeepEqual(s.get(running), s.get(next)) {
			continue
		}
		if s.reloadable {
			apply = append(apply, s.name)
		} else {
			restart = append(restart, s.name)
		}
	}
	return apply, restart
}

// Reload reads the configuration file again and applies it, or changes
// nothing: a file that does not load (the error names the line and the
// reason) or that changes a section this version cannot apply while
// running is refused, and the running configuration stays in force.
func (d *Daemon) Reload() (api.ReloadResult, error) {
	res := api.ReloadResult{Config: d.cfgPath, Applied: []string{}}
	if d.cfgPath == "" {
		return res, fmt.Errorf("reload: the daemon was started without a configuration file")
	}
	next, err := config.Load(d.cfgPath)
	if err != nil {
		return res, fmt.Errorf("reload refused, running configuration kept: %w", err)
	}
	auth, err := newAuthorizer(next.Roles)
	if err != nil {
		return res, fmt.Errorf("reload refused, running configuration kept: config %s: %w", d.cfgPath, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	apply, restart := reloadPlan(d.cfg, next)
	if len(restart) > 0 {
		return res, fmt.Errorf("reload refused, running configuration kept: config %s changes %s, which this version applies only at start: restart the daemon (systemctl restart vmcryptd)",
			d.cfgPath, strings.Join(restart, ", "))
	}
	for _, s := range apply {
		if s == "roles" {
			d.auth.mu.Lock()
			d.auth.bindings = auth.bindings
			d.auth.mu.Unlock()
			d.cfg.Roles = next.Roles // only Reload reads it after New
		}
	}
	res.Applied = append(res.Applied, apply...)
	d.log.Info("configuration reloaded", "config", d.cfgPath, "applied", strings.Join(apply, ","))
	return res, nil
}

type reloadResult struct{ api.ReloadResult }

func (r reloadResult) audit() (string, []string) { return r.Config, nil }

func (d *Daemon) hReload(rc *reqCtx) (any, error) {
	res, err := d.Reload()
	if err != nil {
		return nil, conflict("%v", err)
	}
	return reloadResult{res}, nil
}

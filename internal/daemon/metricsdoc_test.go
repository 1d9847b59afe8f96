package daemon

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"testing"

	"github.com/vmcryptd/vmcryptd/internal/config"
)

// Every metric the daemon's registry exports is documented in
// docs/METRICS.md, and the page documents no metric that does not exist.
func TestMetricsDocumented(t *testing.T) {
	dir := t.TempDir()
	cfg := &config.Config{Socket: filepath.Join(dir, "d.sock"), StateDir: filepath.Join(dir, "state"), AuditLog: filepath.Join(dir, "audit.log")}
	d, err := New(Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	// Vectors appear in Gather only once they have a series.
	d.metrics.requests.WithLabelValues("status", "ok")
	d.metrics.converted.WithLabelValues("encrypt")
	mfs, err := d.metrics.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile("../../docs/METRICS.md")
	if err != nil {
		t.Fatal(err)
	}
	// Documented names are the first cell of a table row: | `name` |
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `([a-z_:][a-z0-9_:]*)` \\|").FindAllSubmatch(doc, -1) {
		documented[string(m[1])] = true
	}
	exported := map[string]bool{}
	for _, mf := range mfs {
		exported[mf.GetName()] = true
		if !documented[mf.GetName()] {
			t.Errorf("metric %s is not documented in docs/METRICS.md", mf.GetName())
		}
	}
	var stale []string
	for name := range documented {
		if !exported[name] {
			stale = append(stale, name)
		}
	}
	sort.Strings(stale)
	for _, name := range stale {
		t.Errorf("docs/METRICS.md documents %s, which the daemon does not export", name)
	}
	if len(exported) < 10 {
		t.Fatalf("only %d metrics gathered", len(exported))
	}
}

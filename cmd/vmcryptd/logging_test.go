package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
)

func TestLogFormat(t *testing.T) {
	tests := []struct {
		flag     string
		terminal bool
		want     string
	}{
		{"auto", true, "text"},
		{"auto", false, "json"},
		{"json", true, "json"},
		{"text", false, "text"},
	}
	for _, tt := range tests {
		if got := logFormat(tt.flag, tt.terminal); got != tt.want {
			t.Errorf("logFormat(%q, terminal=%v) = %q, want %q", tt.flag, tt.terminal, got, tt.want)
		}
		var buf bytes.Buffer
		newLogger(&buf, tt.flag, tt.terminal, slog.LevelInfo).Info("vmcryptd ready", "socket", "/run/x.sock")
		var rec map[string]any
		isJSON := json.Unmarshal(buf.Bytes(), &rec) == nil
		if isJSON != (tt.want == "json") {
			t.Errorf("%q terminal=%v: wrote %q", tt.flag, tt.terminal, buf.String())
		}
		if isJSON && (rec["msg"] != "vmcryptd ready" || rec["socket"] != "/run/x.sock") {
			t.Errorf("json record %v", rec)
		}
		if !isJSON && !strings.Contains(buf.String(), `msg="vmcryptd ready"`) {
			t.Errorf("text record %q", buf.String())
		}
	}
}

package main

import (
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	cases := []struct {
		in   string
		want int64
		err  string
	}{
		{"4096", 4096, ""},
		{"1G", 1 << 30, ""},
		{"512M", 512 << 20, ""},
		{"2TiB", 2 << 40, ""},
		{"0", 0, "positive"},
		{"-1", 0, "positive"},
		{"-1G", 0, "positive"},
		{"1.5G", 0, "positive"},
		{"4194304T", 1 << 62, ""},
		{"8388608T", 0, "too large"},
		{"9223372036854775807K", 0, "too large"},
		{"99999999999999999999", 0, "positive"},
		{"", 0, "positive"},
	}
	for _, tc := range cases {
		got, err := parseSize(tc.in)
		if tc.err == "" && (err != nil || got != tc.want) || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("parseSize(%q) = %d, %v; want %d, %q", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// vm create refuses absurd memory and disk sizes before asking the daemon
// (the daemon and engine refuse them too: engine/enginetest TestCreateLimits).
func TestVMCreateSizeFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--memory", "0"}, "positive"},
		{[]string{"--memory=-1"}, "positive"},
		{[]string{"--memory", "25T"}, "between 4 MiB and 24 TiB"},
		{[]string{"--memory", "1K"}, "between 4 MiB and 24 TiB"},
		{[]string{"--memory", "4194304T"}, "between 4 MiB and 24 TiB"},
		{[]string{"--memory", "8388608T"}, "too large"},
		{[]string{"--memory", "1025K"}, "between 4 MiB"},
		{[]string{"--memory", "5121K"}, "whole number of MiB"},
		{[]string{"--disk", "63T"}, "62 TiB"},
		{[]string{"--disk", "0"}, "positive"},
		{[]string{"--disk", "1000"}, "multiple of 512"},
	}
	sock := t.TempDir() + "/none.sock" // never reached
	for _, tc := range cases {
		args := append([]string{"--socket", sock, "vm", "create", t.TempDir() + "/vm", "--name", "v"}, tc.args...)
		r := vmcryptd(t, nil, nil, args...)
		if r.code == 0 || !strings.Contains(r.err, tc.want) || strings.Contains(r.err, "daemon not running") || strings.Count(strings.TrimSpace(r.err), "\n") > 0 && !strings.Contains(r.err, "Usage") {
			t.Errorf("vm create %v: exit %d, %q; want %q", tc.args, r.code, r.err, tc.want)
		}
	}
}

package kmstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/kms"
)

// groupMembers lists the live (non-zombie) processes of process group pgid.
func groupMembers(pgid int) []string {
	var out []string
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, s := range stats {
		raw, err := os.ReadFile(s)
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces.
		rest := string(raw[bytes.LastIndexByte(raw, ')')+1:])
		var state string
		var ppid, pgrp int
		if _, err := fmt.Sscan(rest, &state, &ppid, &pgrp); err != nil || pgrp != pgid || state == "Z" {
			continue
		}
		out = append(out, strings.TrimSpace(string(raw[:bytes.IndexByte(raw, ')')+1])))
	}
	return out
}

// TestStopStart: keys survive a Stop/Start on the same port, the same
// provider reconnects, and Stop leaves no process of the server's group.
func TestStopStart(t *testing.T) {
	srv := StartPyKMIP(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg := srv.Config("pykmip")
	cfg.Retries = -1
	p, err := kms.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	id, err := p.CreateKey(ctx, "stop-start")
	if err != nil {
		t.Fatal(err)
	}
	want, err := p.GetKey(ctx, id)
	if err != nil {
		t.Fatal(err)
	}

	srv.mu.Lock()
	pgid := srv.proc.cmd.Process.Pid
	srv.mu.Unlock()
	if len(groupMembers(pgid)) == 0 {
		t.Fatalf("no process in pykmip-server's group %d", pgid)
	}
	srv.Stop()
	if srv.Running() {
		t.Fatal("Running after Stop")
	}
	if left := groupMembers(pgid); len(left) > 0 {
		t.Fatalf("processes left after Stop: %v", left)
	}
	srv.Stop() // idempotent
	if _, err := p.GetKey(ctx, id); !errors.Is(err, kms.ErrUnreachable) {
		t.Fatalf("GetKey with the server stopped: %v, want ErrUnreachable", err)
	}

	addr := srv.Addr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	if srv.Addr != addr || !srv.Running() {
		t.Fatalf("after Start: addr %s (was %s), running %v", srv.Addr, addr, srv.Running())
	}
	if err := srv.Start(); err != nil { // no-op while running
		t.Fatal(err)
	}
	got, err := p.GetKey(ctx, id)
	if err != nil {
		t.Fatalf("GetKey after Start: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("key changed across Stop/Start")
	}
}

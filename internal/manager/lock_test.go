package manager

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/internal/mgrproto"
)

// TestHostLock: a locked host is refused every key (host_locked), its
// watch is answered at once, the lock survives a manager restart, and
// other hosts are not affected; unlock hands the same key out again.
func TestHostLock(t *testing.T) {
	l := startLab(t)
	ctx := context.Background()
	h1, _ := l.addHost("host1")
	h2, _ := l.addHost("host2")
	k1, err := h1.CreateKey(ctx, "", "k1")
	if err != nil {
		t.Fatal(err)
	}
	k2, err := h2.CreateKey(ctx, "", "k2")
	if err != nil {
		t.Fatal(err)
	}
	raw1, _, err := h1.GetKey(ctx, k1, "")
	if err != nil {
		t.Fatal(err)
	}

	// A watch held open by host1 is answered as soon as the lock comes.
	type watched struct {
		r   mgrproto.Reply
		err error
		at  time.Time
	}
	wc := make(chan watched, 1)
	go func() {
		r, err := h1.Watch(ctx, false)
		wc <- watched{r, err, time.Now()}
	}()
	time.Sleep(200 * time.Millisecond)
	var lr HostLockReply
	if err := l.admin().Do(ctx, "POST", "/hosts/host1/lock", struct{}{}, &lr); err != nil || !lr.Changed || !lr.Locked {
		t.Fatalf("lock: %+v %v", lr, err)
	}
	locked := time.Now()
	select {
	case w := <-wc:
		if w.err != nil || !w.r.Locked || !strings.Contains(w.r.LockReason, "manager host unlock host1") {
			t.Fatalf("watch: %+v %v", w.r, w.err)
		}
		t.Logf("watch answered %v after the lock", w.at.Sub(locked))
	case <-time.After(mgrproto.WatchHold / 2):
		t.Fatal("the watch was not answered when the host was locked")
	}
	_, _, err = h1.GetKey(ctx, k1, "")
	refusal(t, err, mgrproto.CodeHostLocked, `host "host1" is locked by the manager`)
	_, err = h1.CreateKey(ctx, "", "k3")
	refusal(t, err, mgrproto.CodeHostLocked, "locked")
	if hello, err := h1.Hello(ctx, mgrproto.HostStatus{}); err != nil || !hello.Locked {
		t.Fatalf("hello while locked: %+v %v", hello, err)
	}
	if _, _, err := h2.GetKey(ctx, k2, ""); err != nil {
		t.Fatalf("host2 while host1 is locked: %v", err)
	}
	if err := l.admin().Do(ctx, "POST", "/hosts/host1/lock", struct{}{}, &lr); err != nil || lr.Changed {
		t.Fatalf("second lock: %+v %v", lr, err)
	}
	if err := l.admin().Do(ctx, "POST", "/hosts/ghost/lock", struct{}{}, &lr); err == nil {
		t.Fatal("lock of an unknown host succeeded")
	}

	// The lock survives a manager restart.
	l.stop()
	l.start()
	_, _, err = h1.GetKey(ctx, k1, "")
	refusal(t, err, mgrproto.CodeHostLocked, "locked by the manager")
	var hosts []HostInfo
	if err := l.admin().Do(ctx, "GET", "/hosts", nil, &hosts); err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts {
		if h.Locked != (h.Name == "host1") {
			t.Errorf("host list after restart: %s locked %v", h.Name, h.Locked)
		}
	}

	// A watch that says "locked" is answered at the unlock.
	go func() {
		r, err := h1.Watch(ctx, true)
		wc <- watched{r, err, time.Now()}
	}()
	time.Sleep(200 * time.Millisecond)
	if err := l.admin().Do(ctx, "POST", "/hosts/host1/unlock", struct{}{}, &lr); err != nil || !lr.Changed || lr.Locked {
		t.Fatalf("unlock: %+v %v", lr, err)
	}
	select {
	case w := <-wc:
		if w.err != nil || w.r.Locked {
			t.Fatalf("watch at unlock: %+v %v", w.r, w.err)
		}
	case <-time.After(mgrproto.WatchHold / 2):
		t.Fatal("the watch was not answered at the unlock")
	}
	raw, _, err := h1.GetKey(ctx, k1, "")
	if err != nil || !bytes.Equal(raw, raw1) {
		t.Fatalf("after unlock: %v", err)
	}
	audit, err := os.ReadFile(l.cfg.AuditLog)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range [][2]string{{`"op":"manager.host.lock"`, `"result":"ok"`}, {`"op":"manager.host.unlock"`, `"result":"ok"`}, {`"host":"host1","op":"host.get_key"`, `"result":"denied"`}} {
		found := false
		for _, line := range strings.Split(string(audit), "\n") {
			if strings.Contains(line, want[0]) && strings.Contains(line, want[1]) {
				found = true
			}
		}
		if !found {
			t.Errorf("audit log has no line with %s and %s", want[0], want[1])
		}
	}
}

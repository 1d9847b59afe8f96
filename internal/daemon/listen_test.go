package daemon

import (
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func TestLimitListener(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	inner, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ln := limitListener(inner, 2)
	defer ln.Close()
	accepted := make(chan net.Conn, 3)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	for i := 0; i < 3; i++ {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	var got []net.Conn
	for len(got) < 2 {
		got = append(got, <-accepted)
	}
	select {
	case <-accepted:
		t.Fatal("a third connection was accepted past the cap of 2")
	case <-time.After(100 * time.Millisecond):
	}
	// The accepted connection still exposes its descriptor (SO_PEERCRED).
	if _, ok := got[0].(syscall.Conn); !ok {
		t.Fatal("limited connection hides its descriptor")
	}
	got[0].Close()
	select {
	case c := <-accepted:
		if c == nil {
			t.Fatal("listener closed")
		}
		c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("closing a connection did not free a slot")
	}
	got[1].Close()
	ln.Close()
	for range accepted {
	}
}

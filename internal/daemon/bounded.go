package daemon

import (
	"context"
	"sync"
	"time"
)

// Bounds on work that must never stall the daemon: a stuck file (a FIFO
// where a VM file belongs, a hung network filesystem) or a stuck key
// server costs at most these, then the daemon carries on without it.
const (
	// statusReadTimeout bounds reading one VM's status while registering
	// a datastore's VMs.
	statusReadTimeout = 5 * time.Second
	// mountTimeout bounds one start-up mount; the others do not wait for it.
	mountTimeout = 60 * time.Second
	// Shutdown: HTTP handlers; background work and conversions
	// (resumable); views; key provider connections. Their sum, 12 s,
	// stays inside the 15 s `lab down` waits before it kills.
	shutdownHTTP      = 2 * time.Second
	shutdownWork      = 4 * time.Second
	shutdownUnmount   = 5 * time.Second
	shutdownProviders = 1 * time.Second
)

// waitBounded runs fn and waits for it at most d. It reports whether fn
// finished; if not, fn keeps running in its goroutine and the caller goes
// on without it.
func waitBounded(d time.Duration, fn func()) bool {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// eachBounded runs fn for every item, at most parallel at a time, each
// waited for at most timeout (or until ctx ends): an item that does not
// finish in time is reported to late and left running, and its slot goes
// to the next item, so one stuck item never stalls the rest. It returns
// once every item finished or was given up.
func eachBounded[T any](ctx context.Context, items []T, parallel int, timeout time.Duration, fn func(T), late func(T)) {
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for _, it := range items {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			done := make(chan struct{})
			go func() {
				defer close(done)
				fn(it)
			}()
			t := time.NewTimer(timeout)
			defer t.Stop()
			select {
			case <-done:
			case <-t.C:
				late(it)
			case <-ctx.Done():
				late(it)
			}
		}()
	}
	wg.Wait()
}

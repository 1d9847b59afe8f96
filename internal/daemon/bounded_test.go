package daemon

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestEachBounded(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	cases := []struct {
		name     string
		items    []int
		stuck    map[int]bool
		parallel int
		late     []int
	}{
		{"all quick", []int{1, 2, 3, 4}, nil, 2, nil},
		{"one stuck does not stall the rest", []int{1, 2, 3, 4, 5}, map[int]bool{1: true}, 1, []int{1}},
		{"every one stuck", []int{1, 2, 3}, map[int]bool{1: true, 2: true, 3: true}, 2, []int{1, 2, 3}},
		{"none", nil, nil, 4, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var done, late []int
			start := time.Now()
			eachBounded(context.Background(), tc.items, tc.parallel, 100*time.Millisecond, func(i int) {
				if tc.stuck[i] {
					<-block
					return
				}
				mu.Lock()
				done = append(done, i)
				mu.Unlock()
			}, func(i int) {
				mu.Lock()
				late = append(late, i)
				mu.Unlock()
			})
			mu.Lock()
			defer mu.Unlock()
			if len(done)+len(late) != len(tc.items) || len(late) != len(tc.late) {
				t.Fatalf("done %v late %v", done, late)
			}
			if limit := time.Duration(len(tc.items)+1) * 150 * time.Millisecond; time.Since(start) > limit {
				t.Fatalf("took %v", time.Since(start))
			}
		})
	}
}

func TestEachBoundedContext(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	ctx, cancel := context.WithCancel(context.Background())
	var late atomic.Int32
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	start := time.Now()
	eachBounded(ctx, []int{1, 2, 3}, 1, time.Hour, func(int) { <-block }, func(int) { late.Add(1) })
	if time.Since(start) > 2*time.Second || late.Load() != 1 {
		t.Fatalf("after cancel: %v, %d given up", time.Since(start), late.Load())
	}
}

func TestWaitBounded(t *testing.T) {
	if !waitBounded(time.Second, func() {}) {
		t.Fatal("a quick function was given up")
	}
	block := make(chan struct{})
	defer close(block)
	start := time.Now()
	if waitBounded(50*time.Millisecond, func() { <-block }) || time.Since(start) > time.Second {
		t.Fatal("a stuck function was waited for")
	}
}

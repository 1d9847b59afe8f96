package xts

import (
	"runtime"
	"sync/atomic"
	"testing"
	"unsafe"
)

// Two goroutines running at the same time take different read shards:
// while one holds its P pinned, the other can only run on another P.
func TestReadShardsDistinctPerP(t *testing.T) {
	if runtime.GOMAXPROCS(0) < 2 {
		t.Skip("needs GOMAXPROCS >= 2")
	}
	for round := 0; round < 20; round++ {
		var started, other atomic.Int64
		other.Store(-1)
		done := make(chan int)
		go func() {
			p := procPin()
			started.Store(1)
			for other.Load() < 0 { // pinned: nothing else runs on this P
			}
			procUnpin()
			done <- p
		}()
		go func() {
			for started.Load() == 0 {
				runtime.Gosched()
			}
			q := procPin()
			procUnpin()
			other.Store(int64(q))
		}()
		p := <-done
		q := int(other.Load())
		if p == q || shardFor(p) == shardFor(q) {
			t.Fatalf("round %d: concurrent readers on P %d and P %d share shard %d", round, p, q, shardFor(p))
		}
	}
}

func TestShardFor(t *testing.T) {
	for _, tc := range []struct{ p, want int }{{0, 0}, {1, 1}, {31, 31}, {32, 0}, {33, 1}} {
		if got := shardFor(tc.p); got != tc.want {
			t.Errorf("shardFor(%d) = %d, want %d", tc.p, got, tc.want)
		}
	}
}

// No read shard shares the Cipher's first cache line (the malloc header's),
// and each has a line to itself.
func TestShardLayout(t *testing.T) {
	var c Cipher
	base := uintptr(unsafe.Pointer(&c))
	first := uintptr(unsafe.Pointer(&c.mu.shards[0])) - base
	stride := uintptr(unsafe.Pointer(&c.mu.shards[1])) - uintptr(unsafe.Pointer(&c.mu.shards[0]))
	if first < 64 || stride < 64 {
		t.Fatalf("shard 0 at offset %d, shards %d bytes apart; want >= 64 for both", first, stride)
	}
}

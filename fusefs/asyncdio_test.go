package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// stallObserver holds every encrypted-file read or write for a moment
// before its reply and records how many were held at once: the number of
// requests of one file the kernel had in flight with the view.
type stallObserver struct {
	stall   atomic.Int64 // nanoseconds
	active  atomic.Int32
	maxSeen atomic.Int32
	ops     [NumOps]atomic.Int64
	ios     [NumIO]atomic.Int64
}

func (o *stallObserver) ObserveOp(op Op, start time.Time) {
	o.ops[op].Add(1)
	if start.IsZero() {
		panic("ObserveOp without a start time")
	}
}

func (o *stallObserver) ObserveIO(io IO, start time.Time) {
	o.ios[io].Add(1)
	if io == IOFsync || o.stall.Load() == 0 {
		return
	}
	n := o.active.Add(1)
	for {
		m := o.maxSeen.Load()
		if n <= m || o.maxSeen.CompareAndSwap(m, n) {
			break
		}
	}
	time.Sleep(time.Duration(o.stall.Load()))
	o.active.Add(-1)
}

// fill writes size bytes of a position-dependent pattern through the view.
func pattern(off int64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		p := off + int64(i)
		b[i] = byte(p*7 + p>>12)
	}
	return b
}

// TestAsyncDIOConcurrency: one process with 16 O_DIRECT requests queued
// (fio, libaio and io_uring) has several of them served at once with
// asynchronous direct I/O negotiated, and exactly one at a time without
// it (libaio; io_uring punts to kernel worker threads either way).
func TestAsyncDIOConcurrency(t *testing.T) {
	requireTool(t, "fio")
	cases := []struct {
		engine  string
		noAsync bool
		wantMin int32
		wantMax int32 // 0: no upper bound
	}{
		{"libaio", false, 2, 0},
		{"io_uring", false, 2, 0},
		{"libaio", true, 1, 1},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s/async=%v", tc.engine, !tc.noAsync), func(t *testing.T) {
			obs := &stallObserver{}
			m := mountTest(t, Options{NoAsyncDIO: tc.noAsync, Observer: obs})
			file := m.view("enc/qd.bin")
			if err := os.WriteFile(file, pattern(0, 4<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			obs.stall.Store(int64(2 * time.Millisecond))
			obs.maxSeen.Store(0)
			for _, rw := range []string{"randread", "randwrite"} {
				cmd := exec.Command("fio", "--name=qd", "--filename="+file, "--size=4M", "--io_size=512k",
					"--rw="+rw, "--bs=4k", "--direct=1", "--ioengine="+tc.engine, "--iodepth=16",
					"--iodepth_batch_submit=16", "--output-format=terse")
				if b, err := cmd.CombinedOutput(); err != nil {
					t.Fatalf("fio %s: %v\n%s", rw, err, b)
				}
			}
			got := obs.maxSeen.Load()
			t.Logf("%s: at most %d requests of one file served at once", tc.engine, got)
			if got < tc.wantMin || (tc.wantMax > 0 && got > tc.wantMax) {
				t.Fatalf("%d requests in flight at once, want %d..%d", got, tc.wantMin, tc.wantMax)
			}
			if obs.ops[OpRead].Load() == 0 || obs.ops[OpWrite].Load() == 0 || obs.ios[IORead].Load() == 0 {
				t.Fatalf("observer saw no reads or writes: %v %v", obs.ops[OpRead].Load(), obs.ops[OpWrite].Load())
			}
		})
	}
}

// openDirect opens a view file O_DIRECT and closes it with the test.
func openDirect(t *testing.T, p string, flags int) *os.File {
	t.Helper()
	f, err := os.OpenFile(p, flags|syscall.O_DIRECT, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func wantResults(t *testing.T, ops []*aioOp, want func(i int, o *aioOp) int64) {
	t.Helper()
	for i, o := range ops {
		if w := want(i, o); o.res != w {
			t.Fatalf("request %d (%s): result %d, want %d", i, o, o.res, w)
		}
	}
}

// TestAsyncDIOSubUnitWrites: 512-byte writes into the same 4 KiB data unit,
// all in flight at once, each a read-modify-write of the unit: none may
// lose another's bytes.
func TestAsyncDIOSubUnitWrites(t *testing.T) {
	m := mountTest(t, Options{})
	p := m.view("enc/sub.bin")
	if err := os.WriteFile(p, make([]byte, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	f := openDirect(t, p, os.O_RDWR)
	a := newAIO(t, 64)
	for round := 0; round < 20; round++ {
		var ops []*aioOp
		buf := alignedBuf(t, 64<<10)
		for i := 0; i < 64<<10/512; i++ {
			b := buf[i*512 : (i+1)*512]
			for j := range b {
				b[j] = byte(round*131 + i)
			}
			ops = append(ops, &aioOp{op: aioPwrite, buf: b, off: int64(i) * 512})
		}
		// 128 writes, 8 per unit, submitted at once (64 at a time by the
		// context's depth, so in two batches).
		a.run(int(f.Fd()), ops[:64])
		a.run(int(f.Fd()), ops[64:])
		wantResults(t, ops, func(int, *aioOp) int64 { return 512 })
		rb := alignedBuf(t, 64<<10)
		rd := []*aioOp{{op: aioPread, buf: rb}}
		a.run(int(f.Fd()), rd)
		wantResults(t, rd, func(int, *aioOp) int64 { return 64 << 10 })
		if !bytes.Equal(rb, buf) {
			for i := 0; i < len(rb); i += 512 {
				if !bytes.Equal(rb[i:i+512], buf[i:i+512]) {
					t.Fatalf("round %d: the 512-byte write at %d was lost or torn", round, i)
				}
			}
		}
	}
}

// TestAsyncDIOReadAfterWrite: requests submitted after a batch completed
// see its data, batch after batch (the ordering a guest relies on).
func TestAsyncDIOReadAfterWrite(t *testing.T) {
	m := mountTest(t, Options{})
	p := m.view("enc/order.bin")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f := openDirect(t, p, os.O_RDWR)
	a := newAIO(t, 32)
	for round := 0; round < 16; round++ {
		w := alignedBuf(t, 32*4096)
		for i := range w {
			w[i] = byte(round + i/4096)
		}
		var ops, rds []*aioOp
		r := alignedBuf(t, 32*4096)
		for i := 0; i < 32; i++ {
			off := int64((i*37+round*5)%256) * 4096
			ops = append(ops, &aioOp{op: aioPwrite, buf: w[i*4096 : (i+1)*4096], off: off})
			rds = append(rds, &aioOp{op: aioPread, buf: r[i*4096 : (i+1)*4096], off: off})
		}
		a.run(int(f.Fd()), ops)
		wantResults(t, ops, func(int, *aioOp) int64 { return 4096 })
		a.run(int(f.Fd()), rds)
		wantResults(t, rds, func(int, *aioOp) int64 { return 4096 })
		if !bytes.Equal(w, r) {
			t.Fatalf("round %d: a read submitted after its write completed saw older data", round)
		}
	}
}

// TestAsyncDIOShortReadsAtEOF: a batch of O_DIRECT reads around the end
// of a file whose size is not a multiple of the unit returns exactly the
// bytes up to the end, and 0 past it.
func TestAsyncDIOShortReadsAtEOF(t *testing.T) {
	m := mountTest(t, Options{})
	p := m.view("enc/eof.bin")
	const size = 3*4096 + 1808
	want := pattern(0, size)
	if err := os.WriteFile(p, want, 0o600); err != nil {
		t.Fatal(err)
	}
	f := openDirect(t, p, os.O_RDONLY)
	a := newAIO(t, 16)
	var ops []*aioOp
	for _, rq := range []struct{ off, n int64 }{{0, 4096}, {8192, 16384}, {12288, 4096}, {12288, 8192}, {16384, 4096}, {1 << 20, 4096}, {0, 65536}} {
		ops = append(ops, &aioOp{op: aioPread, buf: alignedBuf(t, int(rq.n)), off: rq.off})
	}
	a.run(int(f.Fd()), ops)
	wantResults(t, ops, func(_ int, o *aioOp) int64 { return max(0, min(int64(len(o.buf)), size-o.off)) })
	for _, o := range ops {
		if o.res > 0 && !bytes.Equal(o.buf[:o.res], want[o.off:o.off+o.res]) {
			t.Fatalf("%s: wrong data", o)
		}
	}
}

// TestAsyncDIOWritesPastEOF: a batch of O_DIRECT writes beyond the end
// (the kernel sends extending writes synchronously) grows the file to
// the furthest one; the gaps read as zeros, also after a remount.
func TestAsyncDIOWritesPastEOF(t *testing.T) {
	m := mountTest(t, Options{})
	p := m.view("enc/grow.bin")
	if err := os.WriteFile(p, pattern(0, 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	f := openDirect(t, p, os.O_RDWR)
	a := newAIO(t, 16)
	offs := []int64{2 << 20, 64 << 10, 1 << 20, 12288, 3<<20 + 4096}
	var ops []*aioOp
	for _, off := range offs {
		b := alignedBuf(t, 4096)
		copy(b, pattern(off, 4096))
		ops = append(ops, &aioOp{op: aioPwrite, buf: b, off: off})
	}
	a.run(int(f.Fd()), append(ops, &aioOp{op: aioFsync}))
	wantResults(t, ops, func(int, *aioOp) int64 { return 4096 })
	const size = 3<<20 + 8192
	expect := make([]byte, size)
	copy(expect, pattern(0, 8192))
	for _, off := range offs {
		copy(expect[off:], pattern(off, 4096))
	}
	check := func(what string) {
		t.Helper()
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != size || !bytes.Equal(got, expect) {
			t.Fatalf("%s: %d bytes, want %d, equal=%v", what, len(got), size, bytes.Equal(got, expect))
		}
	}
	check("through the view")
	f.Close()
	waitReleased(t, m.v)
	c, err := container.OpenContainer(m.backing("enc/grow.bin"), m.b.dek, true, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Size() != size {
		t.Fatalf("at rest: size %d, want %d", c.Size(), size)
	}
}

// TestAsyncDIOAppend: O_APPEND|O_DIRECT writes submitted in one batch each
// land once, in whole, at the end.
func TestAsyncDIOAppend(t *testing.T) {
	m := mountTest(t, Options{})
	p := m.view("enc/append.bin")
	if err := os.WriteFile(p, bytes.Repeat([]byte{0xee}, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	f := openDirect(t, p, os.O_WRONLY|os.O_APPEND)
	a := newAIO(t, 16)
	var ops []*aioOp
	for i := 0; i < 16; i++ {
		b := alignedBuf(t, 4096)
		for j := range b {
			b[j] = byte(i + 1)
		}
		ops = append(ops, &aioOp{op: aioPwrite, buf: b})
	}
	a.run(int(f.Fd()), ops)
	wantResults(t, ops, func(int, *aioOp) int64 { return 4096 })
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 17*4096 || got[0] != 0xee {
		t.Fatalf("after 16 appends: %d bytes, want %d", len(got), 17*4096)
	}
	seen := map[byte]bool{}
	for i := 4096; i < len(got); i += 4096 {
		blk := got[i : i+4096]
		if !bytes.Equal(blk, bytes.Repeat(blk[:1], 4096)) || blk[0] < 1 || blk[0] > 16 || seen[blk[0]] {
			t.Fatalf("block at %d is torn or repeated (%#x)", i, blk[0])
		}
		seen[blk[0]] = true
	}
}

// TestAsyncDIOConcurrentTruncate: batches of O_DIRECT reads and writes run
// while another goroutine shrinks and grows the file. No request fails,
// no read returns bytes that were never written (a torn or stale unit
// would decrypt to noise), and the container is sound at the end.
func TestAsyncDIOConcurrentTruncate(t *testing.T) {
	m := mountTest(t, Options{})
	p := m.view("enc/trunc.bin")
	const size = 1 << 20
	if err := os.WriteFile(p, bytes.Repeat([]byte{1}, size), 0o600); err != nil {
		t.Fatal(err)
	}
	f := openDirect(t, p, os.O_RDWR)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var truncErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			sz := int64(size)
			if i%2 == 0 {
				sz = int64(i%7) * 65536
			}
			if err := os.Truncate(p, sz); err != nil {
				truncErr = err
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	a := newAIO(t, 32)
	deadline := time.Now().Add(2 * time.Second)
	for round := 0; time.Now().Before(deadline); round++ {
		var ops []*aioOp
		val := byte(2 + round%200)
		for i := 0; i < 32; i++ {
			b := alignedBuf(t, 4096)
			off := int64((i*53+round*11)%256) * 4096
			if i%2 == 0 {
				for j := range b {
					b[j] = val
				}
				ops = append(ops, &aioOp{op: aioPwrite, buf: b, off: off})
			} else {
				ops = append(ops, &aioOp{op: aioPread, buf: b, off: off})
			}
		}
		a.run(int(f.Fd()), ops)
		for _, o := range ops {
			if o.res < 0 {
				t.Fatalf("round %d: %s failed: %v", round, o, syscall.Errno(-o.res))
			}
			if o.op == aioPwrite && o.res != 4096 {
				t.Fatalf("round %d: %s wrote %d bytes", round, o, o.res)
			}
			if o.op == aioPread {
				for _, c := range o.buf[:o.res] {
					if c > 201 {
						t.Fatalf("round %d: %s returned byte %#x, never written", round, o, c)
					}
				}
			}
		}
	}
	close(stop)
	wg.Wait()
	if truncErr != nil {
		t.Fatal(truncErr)
	}
	if s := m.logs.String(); strings.Contains(s, "failed") {
		t.Fatalf("view logged failures:\n%s", s)
	}
	f.Close()
	waitReleased(t, m.v)
	c, err := container.OpenContainer(m.backing("enc/trunc.bin"), m.b.dek, true, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, c.Size())
	if _, err := c.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("container at rest: %v", err)
	}
}

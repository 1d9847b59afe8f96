package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
)

// InPlaceWriter is an optional Backend method: WriteAt that may use p
// as scratch space (p's contents are undefined afterwards). The server
// calls it for WRITE payloads, which it owns, to save a copy.
type InPlaceWriter interface {
	WriteAtInPlace(p []byte, off int64) (int, error)
}

// request is one transmission request from its header to the written
// reply. Requests are recycled (Server.reqs).
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
	buf    *[]byte // READ data or WRITE payload; nil for other commands
	weight int64   // bytes taken from the connection's buffer budget

	hdrs  []byte   // reply headers, built before segs points into them
	segs  [][]byte // the reply: headers and data, in order
	spans []span   // a structured read's chunks
}

// Buffers come from power-of-two pools, 4 KiB to MaxPayload.
const minBufShift = 12

// bufPools recycles request buffers and requests of one server.
type bufPools struct {
	bufs [32]sync.Pool
	reqs sync.Pool
}

func (p *bufPools) get(n int) *[]byte {
	shift := max(bits.Len(uint(n-1)), minBufShift)
	if b, ok := p.bufs[shift].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<shift)
	return &b
}

func (p *bufPools) put(b *[]byte) {
	shift := bits.Len(uint(cap(*b) - 1))
	if cap(*b) == 1<<shift && shift < len(p.bufs) {
		p.bufs[shift].Put(b)
	}
}

func (p *bufPools) request() *request {
	if rq, ok := p.reqs.Get().(*request); ok {
		return rq
	}
	return &request{hdrs: make([]byte, 0, 64), segs: make([][]byte, 0, 4)}
}

// txState is a connection's transmission phase: the budget of requests
// and buffer bytes in flight, the worker goroutines and the reply queue.
//
// The reader goroutine parses requests and hands each to a worker (a
// goroutine kept for the connection's life, started when every worker
// is busy, so a request that blocks in the backend never holds back
// the ones after it). A worker queues the reply; whichever worker finds
// no write in progress becomes the writer and writes everything queued
// (one writev for many replies) until the queue is empty. A request's
// slot, buffer and budget are given back once its reply is written, so
// MaxInFlight and MaxBufferBytes bound everything a connection holds,
// also against a client that does not read its replies.
type txState struct {
	c    *conn
	exp  *Export
	size uint64

	slots chan struct{}       // one per request in flight
	mem   *semaphore.Weighted // buffer bytes in flight
	wg    sync.WaitGroup      // requests in flight

	work    chan *request
	free    atomic.Int32 // workers waiting for (or about to take) a request
	workers atomic.Int32 // started

	qmu     sync.Mutex
	queue   net.Buffers // replies waiting to be written
	queued  []*request  // their requests
	writing bool        // a worker is writing
	werr    error       // the write that failed, ending the connection
	spare   net.Buffers
	spareRq []*request
	scratch []byte // the writer's, for TLS

	// Inline service (see readLoop): role is the reader's generation
	// shifted left once, low bit set while it handles a request itself.
	role     atomic.Uint64
	stall    *time.Timer
	end      chan error // the last reader's result
	dispatch int        // requests to hand to workers before trying inline again
}

// Inline service. Handing each request to another goroutine costs
// wake-ups on a loaded machine; a small READ or WRITE is run by the
// reader itself, its reply queued and written (with all others queued)
// only when no further request is buffered. Should it take longer than
// stallAfter (the backend blocked), a new reader takes over the socket
// and the stalled one finishes as a worker, so one slow request never
// holds back those after it. When inline requests are slow (over
// slowInline), the next requests go to workers for a while.
const (
	inlineMax      = 128 << 10
	stallAfter     = 2 * time.Millisecond
	slowInline     = 200 * time.Microsecond
	dispatchStreak = 256
)

// transmit serves requests until NBD_CMD_DISC or a protocol error.
func (c *conn) transmit(exp *Export) error {
	cfg := &c.s.cfg
	tx := &txState{
		c:     c,
		exp:   exp,
		size:  uint64(exp.Backend.Size()),
		slots: make(chan struct{}, cfg.MaxInFlight),
		mem:   semaphore.NewWeighted(cfg.MaxBufferBytes),
		work:  make(chan *request, cfg.MaxInFlight),
		end:   make(chan error, 1),
	}
	tx.stall = time.AfterFunc(time.Hour, tx.takeOver)
	tx.stall.Stop()
	defer close(tx.work)
	defer tx.wg.Wait()
	defer tx.stall.Stop()
	tx.readLoop(0)
	// The last reader (this one, or one that took over) reports the end.
	return <-tx.end
}

// takeOver runs when an inline request stalls: if the reader is still
// in it, the next generation starts reading.
func (tx *txState) takeOver() {
	r := tx.role.Load()
	if r&1 == 0 || !tx.role.CompareAndSwap(r, r+1) {
		return
	}
	go tx.readLoop(r + 1)
}

// readLoop reads requests as reader generation role (even). It returns
// false when it lost the role while running a request inline (that
// request is then done and its reply sent); otherwise it has ended the
// connection and put the result on tx.end.
func (tx *txState) readLoop(role uint64) bool {
	c := tx.c
	cfg := &c.s.cfg
	pools := &c.s.pools
	finish := func(err error) bool {
		tx.flush()
		tx.end <- err
		return true
	}
	var h [28]byte
	for {
		if c.r.Buffered() < len(h) {
			tx.flush() // the client waits for these before sending more
		}
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			c.close()
			if errors.Is(err, io.EOF) {
				return finish(errors.New("client closed the connection without NBD_CMD_DISC"))
			}
			return finish(fmt.Errorf("request: %w", err))
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != magicRequest {
			c.close()
			return finish(fmt.Errorf("request: bad magic %#x", m))
		}
		rq := pools.request()
		rq.flags = binary.BigEndian.Uint16(h[4:])
		rq.typ = binary.BigEndian.Uint16(h[6:])
		rq.cookie = binary.BigEndian.Uint64(h[8:])
		rq.off = binary.BigEndian.Uint64(h[16:])
		rq.length = binary.BigEndian.Uint32(h[24:])
		rq.weight = 0
		switch rq.typ {
		case cmdDisc:
			pools.reqs.Put(rq)
			tx.flush()
			tx.wg.Wait()
			c.close()
			return finish(errDone)
		case cmdWrite:
			if rq.length > uint32(cfg.MaxPayload) {
				// Its payload cannot be skipped at a bounded cost.
				pools.reqs.Put(rq)
				c.close()
				return finish(fmt.Errorf("request: write of %d bytes exceeds the %d-byte limit", rq.length, cfg.MaxPayload))
			}
			rq.weight = int64(rq.length)
		case cmdRead:
			if rq.length <= uint32(cfg.MaxPayload) {
				rq.weight = int64(rq.length)
			}
		}
		if rq.weight > 0 {
			if !tx.mem.TryAcquire(rq.weight) {
				tx.flush() // replies waiting to be written hold the budget
				if err := tx.mem.Acquire(context.Background(), rq.weight); err != nil {
					pools.reqs.Put(rq)
					c.close()
					return finish(err)
				}
			}
			rq.buf = pools.get(int(rq.weight))
		}
		if rq.typ == cmdWrite && rq.buf != nil {
			if c.r.Buffered() < len(*rq.buf) {
				tx.flush()
			}
			if _, err := io.ReadFull(c.r, *rq.buf); err != nil {
				tx.recycle(rq)
				c.close()
				return finish(fmt.Errorf("request: write payload: %w", err))
			}
		}
		select {
		case tx.slots <- struct{}{}:
		default:
			tx.flush()
			tx.slots <- struct{}{}
		}
		tx.wg.Add(1)
		inline := (rq.typ == cmdRead || rq.typ == cmdWrite) && rq.length <= inlineMax && rq.flags&cmdFlagFUA == 0
		if inline && tx.dispatch > 0 {
			tx.dispatch--
			inline = false
		}
		if !inline {
			tx.submit(rq)
			continue
		}
		tx.role.Store(role | 1)
		tx.stall.Reset(stallAfter)
		t0 := time.Now()
		ok := tx.handleSafe(rq)
		took := time.Since(t0)
		if !tx.role.CompareAndSwap(role|1, role) {
			// A successor reads now (the timer is its): finish as a worker.
			tx.finish(rq, ok, true)
			return false
		}
		tx.stall.Stop()
		if took > slowInline {
			tx.dispatch = dispatchStreak
		}
		if !tx.finish(rq, ok, false) {
			// The connection is closed; the next read ends this loop.
			continue
		}
	}
}

// submit hands rq to a worker.
func (tx *txState) submit(rq *request) {
	tx.work <- rq
	// Take a free worker, or start one (it counts as taken). At the
	// cap, the debt is paid by the next worker to finish: only workers
	// whose replies are written already exceed MaxInFlight.
	if tx.free.Add(-1) < 0 && tx.workers.Load() < int32(2*tx.c.s.cfg.MaxInFlight) {
		tx.free.Add(1)
		tx.workers.Add(1)
		go tx.worker()
	}
}

// worker runs requests until the connection ends.
func (tx *txState) worker() {
	for rq := range tx.work {
		tx.run(rq)
		tx.free.Add(1)
	}
}

// run handles one request and sends its reply.
func (tx *txState) run(rq *request) {
	tx.finish(rq, tx.handleSafe(rq), true)
}

// finish sends a handled request's reply (write: now, unless another
// worker is writing; otherwise queued for the reader's next flush), or
// after a panic (ok false) closes the connection. It reports whether
// the connection is still up.
func (tx *txState) finish(rq *request, ok, write bool) bool {
	c := tx.c
	if !ok {
		c.close()
		tx.release(rq)
		return false
	}
	if err := tx.send(rq, write); err != nil {
		// A reply that cannot be written ends the connection; the
		// reader then stops at its next read.
		c.s.log.Warn("nbd reply failed", "export", tx.exp.Name, "err", err)
		c.close()
		return false
	}
	return true
}

// handleSafe is handle where a panic (in the backend or here) costs
// the connection, not the process: it reports false.
func (tx *txState) handleSafe(rq *request) (ok bool) {
	defer func() {
		if r := recover(); r != nil {
			tx.c.s.log.Error("nbd request panicked; closing the connection", "export", tx.exp.Name, "command", rq.typ, "offset", rq.off, "length", rq.length, "panic", r, "stack", string(debug.Stack()))
			ok = false
		}
	}()
	tx.handle(rq)
	return true
}

// release gives back what a request holds once its reply is written
// (or will never be).
func (tx *txState) release(rq *request) {
	tx.recycle(rq)
	<-tx.slots
	tx.wg.Done()
}

// recycle gives back a request's buffer, budget and itself.
func (tx *txState) recycle(rq *request) {
	pools := &tx.c.s.pools
	if rq.buf != nil {
		pools.put(rq.buf)
		rq.buf = nil
	}
	if rq.weight > 0 {
		tx.mem.Release(rq.weight)
		rq.weight = 0
	}
	clear(rq.segs)
	rq.segs = rq.segs[:0]
	rq.hdrs = rq.hdrs[:0]
	rq.spans = rq.spans[:0]
	pools.reqs.Put(rq)
}

// send queues rq's reply (rq.segs) and, unless another worker is
// writing, writes the queue until it is empty. rq is released once its
// reply is written.
func (tx *txState) send(rq *request, write bool) error {
	tx.qmu.Lock()
	if tx.werr != nil {
		err := tx.werr
		tx.qmu.Unlock()
		tx.release(rq)
		return err
	}
	for _, s := range rq.segs {
		if len(s) > 0 {
			tx.queue = append(tx.queue, s)
		}
	}
	tx.queued = append(tx.queued, rq)
	if tx.writing || !write {
		tx.qmu.Unlock()
		return nil
	}
	return tx.drainLocked()
}

// flush writes the queued replies unless a writer is at it (it writes
// them too: it drains the queue before it stops).
func (tx *txState) flush() {
	tx.qmu.Lock()
	if tx.writing || len(tx.queued) == 0 {
		tx.qmu.Unlock()
		return
	}
	if err := tx.drainLocked(); err != nil {
		tx.c.s.log.Warn("nbd reply failed", "export", tx.exp.Name, "err", err)
		tx.c.close()
	}
}

// drainLocked becomes the writer and writes until the queue is empty;
// called with qmu held, returns with it released.
func (tx *txState) drainLocked() error {
	if tx.werr != nil {
		err := tx.werr
		for _, r := range tx.queued {
			tx.release(r)
		}
		tx.queue, tx.queued = tx.queue[:0], tx.queued[:0]
		tx.qmu.Unlock()
		return err
	}
	tx.writing = true
	for {
		bufs, reqs := tx.queue, tx.queued
		tx.queue, tx.queued = tx.spare[:0], tx.spareRq[:0]
		tx.qmu.Unlock()
		err := tx.writeBuffers(bufs)
		for _, r := range reqs {
			tx.release(r)
		}
		clear(bufs)
		clear(reqs)
		tx.qmu.Lock()
		tx.spare, tx.spareRq = bufs[:0], reqs[:0]
		if err != nil {
			tx.werr = fmt.Errorf("writing replies: %w", err)
			for _, r := range tx.queued {
				tx.release(r)
			}
			tx.queue, tx.queued = tx.queue[:0], tx.queued[:0]
			tx.writing = false
			tx.qmu.Unlock()
			return tx.werr
		}
		if len(tx.queued) == 0 {
			tx.writing = false
			tx.qmu.Unlock()
			return nil
		}
	}
}

// writeBuffers writes bufs whole: one writev on a plain socket; on TLS,
// small pieces are gathered so each record carries many of them. Only
// the writer calls it.
func (tx *txState) writeBuffers(bufs net.Buffers) error {
	c := tx.c
	if c.nc == c.raw {
		_, err := bufs.WriteTo(c.nc)
		return err
	}
	const gather = 64 << 10
	out := tx.scratch[:0]
	flush := func() error {
		if len(out) == 0 {
			return nil
		}
		_, err := c.nc.Write(out)
		out = out[:0]
		return err
	}
	for _, b := range bufs {
		if len(b) >= gather {
			if err := flush(); err != nil {
				return err
			}
			if _, err := c.nc.Write(b); err != nil {
				return err
			}
			continue
		}
		if len(out)+len(b) > gather {
			if err := flush(); err != nil {
				return err
			}
		}
		if out == nil {
			out = make([]byte, 0, gather)
		}
		out = append(out, b...)
	}
	tx.scratch = out[:0]
	return flush()
}

// handle runs one request and leaves its reply in rq.segs.
func (tx *txState) handle(rq *request) {
	c, b := tx.c, tx.exp.Backend
	inRange := rq.off <= tx.size && uint64(rq.length) <= tx.size-rq.off
	writeCmd := rq.typ == cmdWrite || rq.typ == cmdTrim || rq.typ == cmdWriteZeroes
	switch {
	case rq.typ != cmdRead && rq.typ != cmdFlush && rq.typ != cmdBlockStatus && !writeCmd:
		tx.fail(rq, errInval, "unknown command")
		return
	case writeCmd && b.ReadOnly():
		tx.fail(rq, errPerm, "export is read-only")
		return
	case rq.typ == cmdRead && rq.length > uint32(c.s.cfg.MaxPayload):
		tx.fail(rq, errInval, "read exceeds the maximum payload")
		return
	case rq.typ != cmdFlush && !inRange:
		tx.fail(rq, errInval, "request beyond the end of the export")
		return
	case rq.typ == cmdBlockStatus && (!c.structured || c.metaFor == nil):
		tx.fail(rq, errInval, "no metadata context negotiated")
		return
	}
	off, n := int64(rq.off), int64(rq.length)
	var err error
	var op string
	switch rq.typ {
	case cmdRead:
		tx.read(rq, off, n)
		return
	case cmdBlockStatus:
		tx.blockStatus(rq, off, n)
		return
	case cmdWrite:
		op = "write"
		if n > 0 {
			if w, ok := b.(InPlaceWriter); ok {
				_, err = w.WriteAtInPlace(*rq.buf, off)
			} else {
				_, err = b.WriteAt(*rq.buf, off)
			}
		}
	case cmdTrim:
		op = "trim"
		if n > 0 {
			err = b.Trim(off, n)
		}
	case cmdWriteZeroes:
		op = "write zeroes"
		if n > 0 {
			err = b.Zero(off, n, rq.flags&cmdFlagNoHole == 0)
		}
	case cmdFlush:
		op = "flush"
		err = b.Flush()
	}
	if err == nil && writeCmd && rq.flags&cmdFlagFUA != 0 {
		op = "flush (FUA)"
		err = b.Flush()
	}
	if err != nil {
		tx.backendErr(rq, op, err)
		return
	}
	tx.simple(rq, 0, nil)
}

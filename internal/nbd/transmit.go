package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"sync"
	"syscall"

	"golang.org/x/sync/semaphore"
)

type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
	data   []byte // WRITE payload
	buf    *[]byte
}

// Buffers come from power-of-two pools, 4 KiB to MaxPayload.
const minBufShift = 12

var bufPools [32]sync.Pool

func getBuf(n int) *[]byte {
	shift := max(bits.Len(uint(n-1)), minBufShift)
	if p, ok := bufPools[shift].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<shift)
	return &b
}

func putBuf(p *[]byte) {
	shift := bits.Len(uint(cap(*p) - 1))
	if cap(*p) == 1<<shift && shift < len(bufPools) {
		bufPools[shift].Put(p)
	}
}

// transmit serves requests until NBD_CMD_DISC or a protocol error.
// Requests run concurrently (at most MaxInFlight, their buffers at most
// MaxBufferBytes); each reply is written whole under wmu, in completion
// order.
func (c *conn) transmit(exp *Export) error {
	cfg := &c.s.cfg
	slots := make(chan struct{}, cfg.MaxInFlight)
	mem := semaphore.NewWeighted(cfg.MaxBufferBytes)
	var wg sync.WaitGroup
	defer wg.Wait()
	size := uint64(exp.Backend.Size())
	var h [28]byte
	for {
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			c.close()
			if errors.Is(err, io.EOF) {
				return errors.New("client closed the connection without NBD_CMD_DISC")
			}
			return fmt.Errorf("request: %w", err)
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != magicRequest {
			c.close()
			return fmt.Errorf("request: bad magic %#x", m)
		}
		rq := &request{
			flags:  binary.BigEndian.Uint16(h[4:]),
			typ:    binary.BigEndian.Uint16(h[6:]),
			cookie: binary.BigEndian.Uint64(h[8:]),
			off:    binary.BigEndian.Uint64(h[16:]),
			length: binary.BigEndian.Uint32(h[24:]),
		}
		var weight int64
		switch rq.typ {
		case cmdDisc:
			wg.Wait()
			c.close()
			return errDone
		case cmdWrite:
			if rq.length > uint32(cfg.MaxPayload) {
				// Its payload cannot be skipped at a bounded cost.
				c.close()
				return fmt.Errorf("request: write of %d bytes exceeds the %d-byte limit", rq.length, cfg.MaxPayload)
			}
			weight = int64(rq.length)
		case cmdRead:
			if rq.length <= uint32(cfg.MaxPayload) {
				weight = int64(rq.length)
			}
		}
		if weight > 0 {
			if err := mem.Acquire(context.Background(), weight); err != nil {
				c.close()
				return err
			}
			rq.buf = getBuf(int(weight))
		}
		if rq.typ == cmdWrite && rq.buf != nil {
			if _, err := io.ReadFull(c.r, *rq.buf); err != nil {
				putBuf(rq.buf)
				c.close()
				return fmt.Errorf("request: write payload: %w", err)
			}
			rq.data = *rq.buf
		}
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := c.handle(exp, rq, size)
			if rq.buf != nil {
				putBuf(rq.buf)
				mem.Release(weight)
			}
			<-slots
			if err != nil {
				// A reply that cannot be written ends the connection; the
				// reader then stops at its next read.
				c.s.log.Warn("nbd reply failed", "export", exp.Name, "err", err)
				c.close()
			}
		}()
	}
}

// errnoOf maps a backend error to an NBD error value.
func errnoOf(err error) uint32 {
	var en syscall.Errno
	if errors.As(err, &en) {
		switch en {
		case syscall.ENOSPC, syscall.EDQUOT:
			return errNoSpc
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return errPerm
		case syscall.EINVAL:
			return errInval
		case syscall.ENOMEM:
			return errNoMem
		case syscall.EOVERFLOW:
			return errOverflow
		}
	}
	return errIO
}

// handle runs one request and writes its reply; an error means the
// reply could not be written.
func (c *conn) handle(exp *Export, rq *request, size uint64) error {
	b := exp.Backend
	inRange := rq.off <= size && uint64(rq.length) <= size-rq.off
	fail := func(errno uint32, msg string) error {
		if c.structured && (rq.typ == cmdRead || rq.typ == cmdBlockStatus) {
			return c.structuredError(rq.cookie, errno, msg)
		}
		return c.simple(rq.cookie, errno, nil)
	}
	backendErr := func(op string, err error) error {
		c.s.log.Error("nbd "+op+" failed", "export", exp.Name, "offset", rq.off, "length", rq.length, "err", err)
		return fail(errnoOf(err), op+" failed: "+err.Error())
	}
	writeCmd := rq.typ == cmdWrite || rq.typ == cmdTrim || rq.typ == cmdWriteZeroes
	switch {
	case rq.typ != cmdRead && rq.typ != cmdFlush && rq.typ != cmdBlockStatus && !writeCmd:
		return fail(errInval, "unknown command")
	case writeCmd && b.ReadOnly():
		return fail(errPerm, "export is read-only")
	case rq.typ == cmdRead && rq.length > uint32(c.s.cfg.MaxPayload):
		return fail(errInval, "read exceeds the maximum payload")
	case rq.typ != cmdFlush && !inRange:
		return fail(errInval, "request beyond the end of the export")
	case rq.typ == cmdBlockStatus && (!c.structured || c.metaFor == nil):
		return fail(errInval, "no metadata context negotiated")
	}
	off, n := int64(rq.off), int64(rq.length)
	switch rq.typ {
	case cmdRead:
		return c.read(exp, rq, off, n, backendErr)
	case cmdWrite:
		if _, err := b.WriteAt(rq.data, off); err != nil {
			return backendErr("write", err)
		}
	case cmdTrim:
		if n > 0 {
			if err := b.Trim(off, n); err != nil {
				return backendErr("trim", err)
			}
		}
	case cmdWriteZeroes:
		if n > 0 {
			if err := b.Zero(off, n, rq.flags&cmdFlagNoHole == 0); err != nil {
				return backendErr("write zeroes", err)
			}
		}
	case cmdFlush:
		if err := b.Flush(); err != nil {
			return backendErr("flush", err)
		}
	case cmdBlockStatus:
		return c.blockStatus(exp, rq, off, n, backendErr)
	}
	if writeCmd && rq.flags&cmdFlagFUA != 0 {
		if err := b.Flush(); err != nil {
			return backendErr("flush (FUA)", err)
		}
	}
	return c.simple(rq.cookie, 0, nil)
}

func (c *conn) simple(cookie uint64, errno uint32, data []byte) error {
	var h [16]byte
	binary.BigEndian.PutUint32(h[0:], magicSimple)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], cookie)
	return c.send(h[:], data)
}

func (c *conn) send(parts ...[]byte) error {
	bufs := make(net.Buffers, 0, len(parts))
	for _, p := range parts {
		if len(p) > 0 {
			bufs = append(bufs, p)
		}
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := bufs.WriteTo(c.nc)
	return err
}

// chunkHeader appends a structured reply chunk header to b.
func chunkHeader(b []byte, flags, typ uint16, cookie uint64, length int) []byte {
	b = binary.BigEndian.AppendUint32(b, magicStructured)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

func (c *conn) structuredError(cookie uint64, errno uint32, msg string) error {
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	b := chunkHeader(nil, replyFlagDone, replyTypeError, cookie, 6+len(msg))
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return c.send(append(b, msg...))
}

type span struct {
	off, n int64
	hole   bool
}

// read answers NBD_CMD_READ: a simple reply with the data, or structured
// chunks where reads of holeReadMin and more report zero ranges as
// NBD_REPLY_TYPE_OFFSET_HOLE (unless the client asked for one chunk).
func (c *conn) read(exp *Export, rq *request, off, n int64, backendErr func(string, error) error) error {
	b := exp.Backend
	if n == 0 {
		if !c.structured {
			return c.simple(rq.cookie, 0, nil)
		}
		return c.send(chunkHeader(nil, replyFlagDone, replyTypeNone, rq.cookie, 0))
	}
	buf := *rq.buf
	spans := []span{{off, n, false}}
	if c.structured && rq.flags&cmdFlagDF == 0 && n >= holeReadMin {
		if s, err := holeSpans(b, off, n); err == nil {
			spans = s
		}
	}
	for _, s := range spans {
		if s.hole {
			continue
		}
		if err := readFull(b, buf[s.off-off:s.off-off+s.n], s.off); err != nil {
			return backendErr("read", err)
		}
	}
	if !c.structured {
		return c.simple(rq.cookie, 0, buf)
	}
	parts := make([][]byte, 0, 2*len(spans))
	for i, s := range spans {
		flags := uint16(0)
		if i == len(spans)-1 {
			flags = replyFlagDone
		}
		if s.hole {
			h := chunkHeader(nil, flags, replyTypeOffsetHole, rq.cookie, 12)
			h = binary.BigEndian.AppendUint64(h, uint64(s.off))
			parts = append(parts, binary.BigEndian.AppendUint32(h, uint32(s.n)))
			continue
		}
		h := chunkHeader(nil, flags, replyTypeOffsetData, rq.cookie, 8+int(s.n))
		parts = append(parts, binary.BigEndian.AppendUint64(h, uint64(s.off)), buf[s.off-off:s.off-off+s.n])
	}
	return c.send(parts...)
}

func readFull(b Backend, p []byte, off int64) error {
	n, err := b.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// holeSpans splits [off, off+n) into data and zero spans by the
// backend's extents; zero spans shorter than preferredBlock are read.
func holeSpans(b Backend, off, n int64) ([]span, error) {
	var out []span
	add := func(s span) {
		if s.hole && s.n < preferredBlock {
			s.hole = false
		}
		if k := len(out); k > 0 && out[k-1].hole == s.hole {
			out[k-1].n += s.n
			return
		}
		out = append(out, s)
	}
	for pos, end := off, off+n; pos < end; {
		exts, err := b.Extents(pos, end-pos)
		if err != nil {
			return nil, err
		}
		if len(exts) == 0 {
			return nil, errors.New("no extents")
		}
		for _, e := range exts {
			if e.Length <= 0 || pos >= end {
				break
			}
			l := min(e.Length, end-pos)
			add(span{pos, l, e.Flags&StateZero != 0})
			pos += l
		}
		if len(out) > 256 {
			// Fragmented: read the rest as data.
			if pos < end {
				add(span{pos, end - pos, false})
			}
			break
		}
	}
	return out, nil
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation.
func (c *conn) blockStatus(exp *Export, rq *request, off, n int64, backendErr func(string, error) error) error {
	if n == 0 {
		return c.structuredError(rq.cookie, errInval, "zero-length block status")
	}
	exts, err := exp.Backend.Extents(off, n)
	if err != nil {
		return backendErr("block status", err)
	}
	payload := binary.BigEndian.AppendUint32(nil, metaBaseAllocationID)
	var total int64
	count := 0
	var last uint32
	for _, e := range exts {
		if e.Length <= 0 || total >= n {
			break
		}
		l := min(e.Length, n-total)
		total += l
		if count > 0 && e.Flags == last {
			// Merge with the previous descriptor.
			i := len(payload) - 8
			binary.BigEndian.PutUint32(payload[i:], binary.BigEndian.Uint32(payload[i:])+uint32(l))
		} else {
			payload = binary.BigEndian.AppendUint32(payload, uint32(l))
			payload = binary.BigEndian.AppendUint32(payload, e.Flags)
			count++
			last = e.Flags
		}
		if count >= maxDescriptors || (rq.flags&cmdFlagReqOne != 0 && count > 1) {
			break
		}
	}
	if count == 0 {
		return backendErr("block status", errors.New("backend returned no extent"))
	}
	if rq.flags&cmdFlagReqOne != 0 && count > 1 {
		payload = payload[:4+8]
	}
	h := chunkHeader(nil, replyFlagDone, replyTypeBlockStatus, rq.cookie, len(payload))
	return c.send(h, payload)
}

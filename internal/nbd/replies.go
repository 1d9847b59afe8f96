package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"syscall"
)

// The replies of the transmission phase: simple and structured (errors,
// data with holes, block status), and the errno mapping.

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

// fail replies with an error: a structured error chunk for READ and
// BLOCK_STATUS when structured replies are on, a simple reply otherwise.
func (tx *txState) fail(rq *request, errno uint32, msg string) {
	if tx.c.structured && (rq.typ == cmdRead || rq.typ == cmdBlockStatus) {
		tx.structuredError(rq, errno, msg)
		return
	}
	tx.simple(rq, errno, nil)
}

func (tx *txState) backendErr(rq *request, op string, err error) {
	tx.c.s.log.Error("nbd "+op+" failed", "export", tx.exp.Name, "offset", rq.off, "length", rq.length, "err", err)
	tx.fail(rq, errnoOf(err), op+" failed: "+err.Error())
}

func (tx *txState) simple(rq *request, errno uint32, data []byte) {
	h := binary.BigEndian.AppendUint32(rq.hdrs[:0], magicSimple)
	h = binary.BigEndian.AppendUint32(h, errno)
	h = binary.BigEndian.AppendUint64(h, rq.cookie)
	rq.hdrs = h
	rq.segs = append(rq.segs[:0], h, data)
}

// chunkHeader appends a structured reply chunk header to b.
func chunkHeader(b []byte, flags, typ uint16, cookie uint64, length int) []byte {
	b = binary.BigEndian.AppendUint32(b, magicStructured)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

func (tx *txState) structuredError(rq *request, errno uint32, msg string) {
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	b := chunkHeader(rq.hdrs[:0], replyFlagDone, replyTypeError, rq.cookie, 6+len(msg))
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	rq.hdrs = append(b, msg...)
	rq.segs = append(rq.segs[:0], rq.hdrs)
}

type span struct {
	off, n int64
	hole   bool
}

// read answers NBD_CMD_READ: a simple reply with the data, or structured
// chunks where reads of holeReadMin and more report whole zero blocks as
// NBD_REPLY_TYPE_OFFSET_HOLE (unless the client asked for one chunk).
func (tx *txState) read(rq *request, off, n int64) {
	c, b := tx.c, tx.exp.Backend
	if n == 0 {
		if !c.structured {
			tx.simple(rq, 0, nil)
			return
		}
		rq.hdrs = chunkHeader(rq.hdrs[:0], replyFlagDone, replyTypeNone, rq.cookie, 0)
		rq.segs = append(rq.segs[:0], rq.hdrs)
		return
	}
	buf := *rq.buf
	if err := readFull(b, buf, off); err != nil {
		tx.backendErr(rq, "read", err)
		return
	}
	if !c.structured {
		tx.simple(rq, 0, buf)
		return
	}
	if rq.flags&cmdFlagDF == 0 && n >= holeReadMin {
		rq.spans = zeroSpans(rq.spans, buf, off)
	} else {
		rq.spans = append(rq.spans[:0], span{off, n, false})
	}
	// Headers first (rq.hdrs may grow), then the segments into them.
	h := rq.hdrs[:0]
	for i, s := range rq.spans {
		flags := uint16(0)
		if i == len(rq.spans)-1 {
			flags = replyFlagDone
		}
		if s.hole {
			h = chunkHeader(h, flags, replyTypeOffsetHole, rq.cookie, 12)
			h = binary.BigEndian.AppendUint64(h, uint64(s.off))
			h = binary.BigEndian.AppendUint32(h, uint32(s.n))
			continue
		}
		h = chunkHeader(h, flags, replyTypeOffsetData, rq.cookie, 8+int(s.n))
		h = binary.BigEndian.AppendUint64(h, uint64(s.off))
	}
	rq.hdrs = h
	rq.segs = rq.segs[:0]
	pos := 0
	for _, s := range rq.spans {
		if s.hole {
			rq.segs = append(rq.segs, h[pos:pos+32])
			pos += 32
			continue
		}
		rq.segs = append(rq.segs, h[pos:pos+28], buf[s.off-off:s.off-off+s.n])
		pos += 28
	}
}

// maxReadChunks caps the chunks of one structured read reply; past it
// the rest of the read is one data chunk.
const maxReadChunks = 256

// zeroBlock is compared against (never written).
var zeroBlock [preferredBlock]byte

// zeroSpans splits p, read from off, into data and zero spans for a
// structured read reply: a zero span is a run of whole preferredBlock
// blocks (aligned to the export, not to p) that read as all zeros;
// everything else, partial edge blocks included, is data. Adjacent
// spans of one kind are merged; after maxReadChunks spans the rest is
// data. The result is appended to dst[:0].
//
// Holes come from the data read, not from the backend's extents: what
// is reported as a hole is what was read, whatever the backing store,
// and finding them costs a comparison per block (SEEK_HOLE on tmpfs
// walks the page cache up to the next hole, the end of a full file:
// milliseconds per 1 MiB read of a 1 GiB disk).
func zeroSpans(dst []span, p []byte, off int64) []span {
	out := dst[:0]
	end := off + int64(len(p))
	for pos := off; pos < end; {
		next := min((pos/preferredBlock+1)*preferredBlock, end)
		if len(out) >= maxReadChunks {
			next = end
		}
		b := p[pos-off : next-off]
		hole := len(b) == preferredBlock && bytes.Equal(b, zeroBlock[:])
		if k := len(out); k > 0 && out[k-1].hole == hole {
			out[k-1].n += next - pos
		} else {
			out = append(out, span{pos, next - pos, hole})
		}
		pos = next
	}
	return out
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

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation.
func (tx *txState) blockStatus(rq *request, off, n int64) {
	if n == 0 {
		tx.structuredError(rq, errInval, "zero-length block status")
		return
	}
	exts, err := tx.exp.Backend.Extents(off, n)
	if err != nil {
		tx.backendErr(rq, "block status", err)
		return
	}
	// The chunk header (20 bytes) is filled in once the length is known.
	payload := append(rq.hdrs[:0], make([]byte, 20)...)
	payload = binary.BigEndian.AppendUint32(payload, metaBaseAllocationID)
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
		rq.hdrs = payload[:0]
		tx.backendErr(rq, "block status", errors.New("backend returned no extent"))
		return
	}
	if rq.flags&cmdFlagReqOne != 0 && count > 1 {
		payload = payload[:20+4+8]
	}
	chunkHeader(payload[:0], replyFlagDone, replyTypeBlockStatus, rq.cookie, len(payload)-20)
	rq.hdrs = payload
	rq.segs = append(rq.segs[:0], payload)
}

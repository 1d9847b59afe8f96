package fusefs

import (
	"fmt"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal Linux AIO (io_setup/io_submit/io_getevents) client for tests:
// with the view's asynchronous direct I/O, the requests of one io_submit
// reach the daemon concurrently, as QEMU's aio=native sends them.

const (
	aioPread  = 0 // IOCB_CMD_PREAD
	aioPwrite = 1 // IOCB_CMD_PWRITE
	aioFsync  = 2 // IOCB_CMD_FSYNC
)

// iocb is struct iocb of <linux/aio_abi.h> (little-endian layout); the
// blank fields are the kernel's key, rw_flags, reqprio, reserved2, flags
// and resfd, which these tests leave zero.
type iocb struct {
	data   uint64
	_      uint32
	_      uint32
	opcode uint16
	_      int16
	fd     uint32
	buf    uint64
	nbytes uint64
	offset int64
	_      uint64
	_      uint32
	_      uint32
}

// ioEvent is struct io_event.
type ioEvent struct {
	data uint64
	obj  uint64
	res  int64
	res2 int64
}

type aioCtx struct {
	t  testing.TB
	id uintptr
}

func newAIO(t testing.TB, depth int) *aioCtx {
	t.Helper()
	var id uintptr
	if _, _, e := syscall.Syscall(unix.SYS_IO_SETUP, uintptr(depth), uintptr(unsafe.Pointer(&id)), 0); e != 0 {
		t.Fatalf("io_setup: %v", e)
	}
	a := &aioCtx{t: t, id: id}
	t.Cleanup(func() { syscall.Syscall(unix.SYS_IO_DESTROY, a.id, 0, 0) })
	return a
}

// aioOp is one request and, after run, its result (bytes or -errno).
type aioOp struct {
	op  uint16
	buf []byte // page-aligned for O_DIRECT (alignedBuf)
	off int64
	res int64
}

// run submits every op in one io_submit and waits for all of them.
func (a *aioCtx) run(fd int, ops []*aioOp) {
	a.t.Helper()
	cbs := make([]iocb, len(ops))
	ptrs := make([]*iocb, len(ops))
	for i, o := range ops {
		cbs[i] = iocb{data: uint64(i), opcode: o.op, fd: uint32(fd), offset: o.off}
		if len(o.buf) > 0 {
			cbs[i].buf = uint64(uintptr(unsafe.Pointer(&o.buf[0])))
			cbs[i].nbytes = uint64(len(o.buf))
		}
		ptrs[i] = &cbs[i]
	}
	for done := 0; done < len(ptrs); {
		n, _, e := syscall.Syscall(unix.SYS_IO_SUBMIT, a.id, uintptr(len(ptrs)-done), uintptr(unsafe.Pointer(&ptrs[done])))
		if e != 0 {
			a.t.Fatalf("io_submit: %v", e)
		}
		done += int(n)
	}
	evs := make([]ioEvent, len(ops))
	for got := 0; got < len(ops); {
		n, _, e := syscall.Syscall6(unix.SYS_IO_GETEVENTS, a.id, 1, uintptr(len(ops)-got), uintptr(unsafe.Pointer(&evs[got])), 0, 0)
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			a.t.Fatalf("io_getevents: %v", e)
		}
		got += int(n)
	}
	for _, ev := range evs {
		ops[ev.data].res = ev.res
	}
	// The kernel held pointers into cbs and the buffers until now.
	keepAlive(cbs, ptrs)
}

//go:noinline
func keepAlive(...any) {}

// alignedBuf is n bytes of page-aligned memory (mmap), unmapped at the
// end of the test: O_DIRECT needs aligned buffers, and the kernel writes
// into them while Go code does not look.
func alignedBuf(t testing.TB, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatalf("mmap %d: %v", n, err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func (o *aioOp) String() string {
	name := map[uint16]string{aioPread: "pread", aioPwrite: "pwrite", aioFsync: "fsync"}[o.op]
	return fmt.Sprintf("%s %d@%d", name, len(o.buf), o.off)
}

package nbd

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// sparseImage makes an 8 MiB file with data at [512K, 640K) and
// [4M, 4M+4K) and holes elsewhere.
func sparseImage(t *testing.T) (string, []byte) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	want := make([]byte, 8<<20)
	rand.Read(want[512<<10 : 640<<10])
	rand.Read(want[4<<20 : 4<<20+4096])
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(want))); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int{{512 << 10, 640 << 10}, {4 << 20, 4<<20 + 4096}} {
		if _, err := f.WriteAt(want[r[0]:r[1]], int64(r[0])); err != nil {
			t.Fatal(err)
		}
	}
	return p, want
}

func openBackend(t *testing.T, p string, ro bool) *fileBackend {
	t.Helper()
	flag := os.O_RDWR
	if ro {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(p, flag, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileBackend{f: f, ro: ro}
}

func uri(sock string) string { return "nbd+unix:///?socket=" + sock }

// TestQemuImg: qemu-img info, compare and convert read the export; the
// converted copy keeps the holes (block status reached qemu-img).
func TestQemuImg(t *testing.T) {
	requireTool(t, "qemu-img")
	p, want := sparseImage(t)
	_, sock := serveUnix(t, Config{Export: &Export{Backend: openBackend(t, p, true)}})
	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", uri(sock))), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != int64(len(want)) || info.Format != "raw" {
		t.Fatalf("qemu-img info: %+v", info)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", p, uri(sock))
	out := filepath.Join(t.TempDir(), "copy.raw")
	run(t, "qemu-img", "convert", "-O", "raw", uri(sock), out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("converted copy differs")
	}
	if used := allocated(t, out); used > 1<<20 {
		t.Fatalf("converted copy allocates %d bytes: holes were not reported", used)
	}
}

func allocated(t *testing.T, p string) int64 {
	t.Helper()
	b, err := (&fileBackend{f: mustOpen(t, p)}).Extents(0, fileSize(t, p))
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range b {
		if e.Flags&StateHole == 0 {
			n += e.Length
		}
	}
	return n
}

func mustOpen(t *testing.T, p string) *os.File {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func fileSize(t *testing.T, p string) int64 {
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// TestQemuIoWrites: writes with FUA, write-zeroes, discard and flush from
// qemu-io land in the file; a read-only export refuses writes.
func TestQemuIoWrites(t *testing.T) {
	requireTool(t, "qemu-io")
	p, want := sparseImage(t)
	_, sock := serveUnix(t, Config{Export: &Export{Backend: openBackend(t, p, false)}})
	run(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 1M 1M",
		"-c", "write -f -P 0xcd 3M 4k", // FUA
		"-c", "write -z 512k 64k",
		"-c", "discard 4M 4k",
		"-c", "aio_write -P 0x11 6M 64k", "-c", "aio_write -P 0x22 7M 64k", "-c", "aio_flush",
		"-c", "flush", uri(sock))
	fill := func(off, n int, b byte) { copy(want[off:off+n], bytes.Repeat([]byte{b}, n)) }
	fill(1<<20, 1<<20, 0xab)
	fill(3<<20, 4096, 0xcd)
	fill(512<<10, 64<<10, 0)
	fill(4<<20, 4096, 0)
	fill(6<<20, 64<<10, 0x11)
	fill(7<<20, 64<<10, 0x22)
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("file differs at %d", i)
	}
	out := run(t, "qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 1M", "-c", "read -P 0 4M 4k", uri(sock))
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatal(out)
	}

	p2, want2 := sparseImage(t)
	_, ro := serveUnix(t, Config{Export: &Export{Backend: openBackend(t, p2, true)}})
	if msg, err := execOut("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri(ro)); err == nil && !strings.Contains(msg, "read-only") {
		t.Fatalf("write to a read-only export: %s", msg)
	}
	if got, _ := os.ReadFile(p2); !bytes.Equal(got, want2) {
		t.Fatal("a read-only export was written")
	}
}

func firstDiff(a, b []byte) int {
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestNbdinfoMap: libnbd's nbdinfo sees the export's holes through
// base:allocation block status, and its flags.
func TestNbdinfoMap(t *testing.T) {
	requireTool(t, "nbdinfo")
	p, _ := sparseImage(t)
	_, sock := serveUnix(t, Config{Export: &Export{Name: "d1", Description: "test disk", Backend: openBackend(t, p, false)}})
	out := run(t, "nbdinfo", "--map", "--json", "nbd+unix:///d1?socket="+sock)
	var m []struct {
		Offset, Length int64
		Type           uint32
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	type ext struct {
		off, n int64
		typ    uint32
	}
	want := []ext{{0, 512 << 10, 3}, {512 << 10, 128 << 10, 0}, {640 << 10, 4<<20 - 640<<10, 3}, {4 << 20, 4096, 0}, {4<<20 + 4096, 4<<20 - 4096, 3}}
	if len(m) != len(want) {
		t.Fatalf("map: %s", out)
	}
	for i, e := range m {
		if (ext{e.Offset, e.Length, e.Type}) != want[i] {
			t.Fatalf("map entry %d: %+v, want %+v", i, e, want[i])
		}
	}
	info := run(t, "nbdinfo", "--json", "nbd+unix:///d1?socket="+sock)
	for _, s := range []string{`"export-size": 8388608`, `"can_multi_conn": true`, `"can_fua": true`, `"can_trim": true`, `"block_size_preferred": 4096`, `"description": "test disk"`} {
		if !strings.Contains(info, s) {
			t.Errorf("nbdinfo lacks %s:\n%s", s, info)
		}
	}
	if list := run(t, "nbdinfo", "--list", "--json", uri(sock)); !strings.Contains(list, `"export-name": "d1"`) {
		t.Errorf("nbdinfo --list: %s", list)
	}
}

// slowBackend delays reads at offset 0, so later requests overtake them.
type slowBackend struct {
	*memBackend
	release chan struct{}
}

func (s *slowBackend) ReadAt(p []byte, off int64) (int, error) {
	if off == 0 {
		<-s.release
	}
	return s.memBackend.ReadAt(p, off)
}

// client is a minimal NBD client for protocol tests.
type client struct {
	t *testing.T
	c net.Conn
}

func dial(t *testing.T, sock string) *client {
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	cl := &client{t, c}
	var hs [18]byte
	cl.read(hs[:])
	if binary.BigEndian.Uint64(hs[:]) != magicNBD || binary.BigEndian.Uint64(hs[8:]) != magicOpt {
		t.Fatalf("bad greeting % x", hs)
	}
	cl.write(binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes))
	return cl
}

func (c *client) read(p []byte) {
	c.t.Helper()
	if _, err := io.ReadFull(c.c, p); err != nil {
		c.t.Fatal(err)
	}
}

func (c *client) write(p []byte) {
	c.t.Helper()
	if _, err := c.c.Write(p); err != nil {
		c.t.Fatal(err)
	}
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// optReply reads one option reply: its type and data.
func (c *client) optReply() (uint32, []byte) {
	var h [20]byte
	c.read(h[:])
	if binary.BigEndian.Uint64(h[:]) != magicOptReply {
		c.t.Fatalf("bad option reply magic % x", h)
	}
	d := make([]byte, binary.BigEndian.Uint32(h[16:]))
	c.read(d)
	return binary.BigEndian.Uint32(h[12:]), d
}

func goData(name string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	return binary.BigEndian.AppendUint16(b, 0)
}

// goExport sends NBD_OPT_GO and reads replies until the ACK.
func (c *client) goExport(name string) {
	c.t.Helper()
	c.write(optBytes(optGo, goData(name)))
	for {
		typ, d := c.optReply()
		if typ == repAck {
			return
		}
		if typ != repInfo {
			c.t.Fatalf("NBD_OPT_GO: reply %#x %q", typ, d)
		}
	}
}

func reqBytes(flags, typ uint16, cookie, off uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

// TestOutOfOrderReplies: a slow read does not hold back the requests
// sent after it on the same connection, and each reply carries its
// request's data.
func TestOutOfOrderReplies(t *testing.T) {
	mb := &memBackend{b: make([]byte, 1<<20)}
	for i := range mb.b {
		mb.b[i] = byte(i / 4096)
	}
	sb := &slowBackend{mb, make(chan struct{})}
	_, sock := serveUnix(t, Config{Export: &Export{Backend: sb}})
	c := dial(t, sock)
	c.goExport("")
	c.write(reqBytes(0, cmdRead, 100, 0, 4096))
	for i := 1; i <= 8; i++ {
		c.write(reqBytes(0, cmdRead, uint64(100+i), uint64(i*4096), 4096))
	}
	seen := map[uint64]bool{}
	for i := 0; i < 9; i++ {
		var h [16]byte
		c.read(h[:])
		if binary.BigEndian.Uint32(h[:]) != magicSimple || binary.BigEndian.Uint32(h[4:]) != 0 {
			t.Fatalf("reply % x", h)
		}
		cookie := binary.BigEndian.Uint64(h[8:])
		data := make([]byte, 4096)
		c.read(data)
		if want := byte(cookie - 100); data[0] != want || data[4095] != want {
			t.Fatalf("cookie %d: data %d", cookie, data[0])
		}
		if i == 0 && cookie == 100 {
			t.Fatal("the slow read was answered first")
		}
		seen[cookie] = true
		if i == 7 {
			close(sb.release)
		}
	}
	if len(seen) != 9 {
		t.Fatalf("replies: %v", seen)
	}
	c.write(reqBytes(0, cmdDisc, 0, 0, 0))
}

// TestHostileClients: each malformed exchange costs its connection only,
// and the server keeps serving others.
func TestHostileClients(t *testing.T) {
	s, sock := serveUnix(t, Config{Export: &Export{Backend: &memBackend{b: make([]byte, 1<<20)}}, HandshakeTimeout: 2 * time.Second, MaxPayload: 1 << 20})
	huge := binary.BigEndian.AppendUint64(nil, magicOpt)
	huge = binary.BigEndian.AppendUint32(huge, optGo)
	huge = binary.BigEndian.AppendUint32(huge, 1<<30)
	badName := binary.BigEndian.AppendUint32(nil, 1<<31)
	badName = binary.BigEndian.AppendUint16(badName, 0)
	cases := []struct {
		name string
		opts []byte // after the client flags
		tx   []byte // after a successful GO
	}{
		{name: "bad option magic", opts: []byte("XXXXXXXXXXXXXXXXXXXX")},
		{name: "huge option", opts: huge},
		{name: "export name unknown", opts: optBytes(optExportName, []byte("nope"))},
		{name: "lying name length", opts: append(optBytes(optGo, badName), optBytes(optAbort, nil)...)},
		{name: "bad request magic", tx: []byte("0123456789012345678901234567")},
		{name: "write too large", tx: reqBytes(0, cmdWrite, 1, 0, 1<<30)},
		{name: "truncated write", tx: append(reqBytes(0, cmdWrite, 1, 0, 4096), 1, 2, 3)},
		{name: "read past the end, then eof", tx: reqBytes(0, cmdRead, 1, 1<<40, 4096)},
		{name: "block status without context", tx: reqBytes(0, cmdBlockStatus, 1, 0, 4096)},
		{name: "unknown command", tx: reqBytes(0, 77, 1, 0, 0)},
		{name: "zero-length write", tx: reqBytes(0, cmdWrite, 1, 0, 0)},
		{name: "zero-length write past the end", tx: reqBytes(cmdFlagFUA, cmdWrite, 1, 1<<40, 0)},
		{name: "unknown command with a length", tx: reqBytes(0, 5, 1, 0, 1<<30)},
		{name: "stalled handshake"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, sock)
			if tc.tx != nil {
				c.goExport("")
				c.write(tc.tx)
			} else if tc.opts != nil {
				c.write(tc.opts)
			}
			c.c.(*net.UnixConn).CloseWrite()
			io.Copy(io.Discard, c.c) // the server must end the connection
		})
	}
	// Still serving.
	c := dial(t, sock)
	c.goExport("")
	c.write(reqBytes(0, cmdRead, 7, 0, 512))
	var h [16]byte
	c.read(h[:])
	if binary.BigEndian.Uint64(h[8:]) != 7 || binary.BigEndian.Uint32(h[4:]) != 0 {
		t.Fatalf("reply % x", h)
	}
	c.read(make([]byte, 512))
	c.write(reqBytes(0, cmdDisc, 0, 0, 0))
	c.c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for s.Conns() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.Conns(); n != 0 {
		t.Fatalf("%d connections left open", n)
	}
}

// TestOptionReplies: option errors are replies, not disconnects.
func TestOptionReplies(t *testing.T) {
	_, sock := serveUnix(t, Config{Export: &Export{Name: "x", Backend: &memBackend{b: make([]byte, 4096)}}})
	metaQ := func(name string, qs ...string) []byte {
		b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
		b = append(b, name...)
		b = binary.BigEndian.AppendUint32(b, uint32(len(qs)))
		for _, q := range qs {
			b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
			b = append(b, q...)
		}
		return b
	}
	c := dial(t, sock)
	for _, tc := range []struct {
		opt  uint32
		data []byte
		want []uint32
	}{
		{99, nil, []uint32{repErrUnsup}},
		{optGo, goData("nope"), []uint32{repErrUnknown}},
		{optStartTLS, nil, []uint32{repErrPolicy}},
		{optSetMetaCtx, metaQ("x", "base:allocation"), []uint32{repErrInvalid}}, // before structured replies
		{optStructuredRepl, []byte{1}, []uint32{repErrInvalid}},
		{optStructuredRepl, nil, []uint32{repAck}},
		{optListMetaCtx, metaQ("x"), []uint32{repMetaContext, repAck}},
		{optSetMetaCtx, metaQ("x", "qemu:dirty-bitmap:a"), []uint32{repAck}},
		{optSetMetaCtx, metaQ("x", "base:allocation"), []uint32{repMetaContext, repAck}},
		{optList, nil, []uint32{repServer, repAck}},
		{optInfo, goData("x"), []uint32{repInfo, repInfo, repAck}},
	} {
		c.write(optBytes(tc.opt, tc.data))
		for _, w := range tc.want {
			if typ, d := c.optReply(); typ != w {
				t.Fatalf("option %d: reply %#x (%q), want %#x", tc.opt, typ, d, w)
			}
		}
	}
	c.write(optBytes(optAbort, nil))
	if typ, _ := c.optReply(); typ != repAck {
		t.Fatalf("abort: %#x", typ)
	}
}

// TestStructuredRead: a large read over holes comes back as data and
// hole chunks that reassemble to the content; with DF, as one chunk.
func TestStructuredRead(t *testing.T) {
	p, want := sparseImage(t)
	_, sock := serveUnix(t, Config{Export: &Export{Backend: openBackend(t, p, true)}})
	c := dial(t, sock)
	c.write(optBytes(optStructuredRepl, nil))
	c.optReply()
	c.goExport("")
	for _, flags := range []uint16{0, cmdFlagDF} {
		c.write(reqBytes(flags, cmdRead, 5, 0, 1<<20))
		got := bytes.Repeat([]byte{0xee}, 1<<20)
		var types []uint16
		for done := false; !done; {
			var h [20]byte
			c.read(h[:])
			if binary.BigEndian.Uint32(h[:]) != magicStructured || binary.BigEndian.Uint64(h[8:]) != 5 {
				t.Fatalf("chunk % x", h)
			}
			done = binary.BigEndian.Uint16(h[4:])&replyFlagDone != 0
			typ := binary.BigEndian.Uint16(h[6:])
			types = append(types, typ)
			d := make([]byte, binary.BigEndian.Uint32(h[16:]))
			c.read(d)
			off := binary.BigEndian.Uint64(d)
			switch typ {
			case replyTypeOffsetData:
				copy(got[off:], d[8:])
			case replyTypeOffsetHole:
				clear(got[off : off+uint64(binary.BigEndian.Uint32(d[8:]))])
			default:
				t.Fatalf("chunk type %d", typ)
			}
		}
		if !bytes.Equal(got, want[:1<<20]) {
			t.Fatalf("flags %d: reassembled read differs", flags)
		}
		wantTypes := []uint16{replyTypeOffsetHole, replyTypeOffsetData, replyTypeOffsetHole}
		if flags == cmdFlagDF {
			wantTypes = []uint16{replyTypeOffsetData}
		}
		if len(types) != len(wantTypes) {
			t.Fatalf("flags %d: chunks %v", flags, types)
		}
	}
}

func execOut(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// TestCloseWakesIdleReader: a connection in transmission whose client
// sends nothing (its reader waiting on the socket) is ended by
// Server.Close, and one whose client goes away ends by itself.
func TestCloseWakesIdleReader(t *testing.T) {
	s, sock := serveUnix(t, Config{Export: &Export{Backend: &memBackend{b: make([]byte, 1<<20)}}})
	idle := func() *client {
		c := dial(t, sock)
		c.goExport("")
		c.write(reqBytes(0, cmdRead, 1, 4096, 4096))
		var r [16 + 4096]byte
		c.read(r[:])
		if binary.BigEndian.Uint32(r[:]) != magicSimple || binary.BigEndian.Uint64(r[8:]) != 1 {
			t.Fatalf("reply % x", r[:16])
		}
		return c
	}
	waitConns := func(n int) {
		t.Helper()
		for i := 0; s.Conns() != n; i++ {
			if i > 2000 {
				t.Fatalf("%d connections open, want %d", s.Conns(), n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	gone := idle()
	gone.c.Close()
	waitConns(0)

	c := idle()
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("Server.Close did not return with an idle connection open")
	}
	if n, err := c.c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client read after Close: %d, %v (want EOF)", n, err)
	}
}

package nbd

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// FuzzServer feeds hostile bytes to a server as a client: option
// haggling then, when the bytes get there, transmission. The server must
// end the connection (never hang, never panic) and leave nothing behind.
// Seeds cover each option and command; `go test -fuzz FuzzServer` runs
// the long campaign.
func FuzzServer(f *testing.F) {
	flags := binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes)
	meta := func(q string) []byte {
		b := binary.BigEndian.AppendUint32(nil, 0)
		b = binary.BigEndian.AppendUint32(b, 1)
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		return append(b, q...)
	}
	neg := append(append([]byte{}, flags...), optBytes(optStructuredRepl, nil)...)
	neg = append(neg, optBytes(optSetMetaCtx, meta("base:allocation"))...)
	neg = append(neg, optBytes(optGo, goData(""))...)
	f.Add(flags)
	f.Add(append(append([]byte{}, flags...), optBytes(optList, nil)...))
	f.Add(append(append([]byte{}, flags...), optBytes(optListMetaCtx, meta("base:"))...))
	f.Add(append(append([]byte{}, flags...), optBytes(optExportName, nil)...))
	f.Add(append(append([]byte{}, flags...), optBytes(optInfo, goData("x"))...))
	f.Add(append(append([]byte{}, flags...), optBytes(optStartTLS, nil)...))
	for _, rq := range [][]byte{
		reqBytes(0, cmdRead, 1, 0, 128<<10),
		reqBytes(cmdFlagDF, cmdRead, 1, 4096, 4096),
		append(reqBytes(cmdFlagFUA, cmdWrite, 2, 8, 4), 1, 2, 3, 4),
		reqBytes(0, cmdTrim, 3, 0, 4096),
		reqBytes(cmdFlagNoHole, cmdWriteZeroes, 4, 100, 5000),
		reqBytes(cmdFlagReqOne, cmdBlockStatus, 5, 0, 1<<18),
		reqBytes(0, cmdBlockStatus, 5, 1<<17, 1<<17),
		reqBytes(0, cmdFlush, 6, 0, 0),
		reqBytes(0, cmdRead, 7, 1<<18-1, 2),
		reqBytes(0, cmdDisc, 8, 0, 0),
		reqBytes(0, cmdWrite, 9, 0, 0),
		reqBytes(0, cmdRead, 10, 0, 0),
		reqBytes(0, 5, 11, 0, 1<<20),
	} {
		f.Add(append(append([]byte{}, neg...), rq...))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		s := NewServer(Config{Export: &Export{Backend: &memBackend{b: make([]byte, 1<<18)}}, HandshakeTimeout: time.Second, MaxPayload: 1 << 18})
		cl, sv := net.Pipe()
		done := make(chan struct{})
		go func() { s.ServeConn(sv); close(done) }()
		go io.Copy(io.Discard, cl)
		cl.SetWriteDeadline(time.Now().Add(2 * time.Second))
		cl.Write(in)
		cl.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("server did not end the connection")
		}
		s.Close()
	})
}

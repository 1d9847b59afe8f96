package labkms

import (
	"context"
	"encoding/binary"
	"io"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/payloads"
	"github.com/ovh/kmip-go/ttlv"
)

// TestOpenSSLClient: the generated certificates work for an OpenSSL-based
// client: `openssl s_client` verifies the server against ca.pem, presents
// client.pem, sends a raw KMIP Discover Versions and gets an answer.
func TestOpenSSLClient(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("openssl not found (CI=true: a missing peer is a failure)")
		}
		t.Skip("openssl not found; skipping")
	}
	s := start(t, initDir(t))
	p := s.Paths()

	for _, tlsVersion := range []string{"-tls1_2", "-tls1_3"} {
		t.Run(tlsVersion, func(t *testing.T) {
			c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(c, openssl, "s_client", "-quiet", tlsVersion,
				"-connect", s.Addr(), "-servername", "localhost", "-verify_hostname", "localhost",
				"-CAfile", p.CACert, "-cert", p.ClientCert, "-key", p.ClientKey, "-verify_return_error")
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
			}()

			req := kmip.NewRequestMessage(kmip.V1_1, &payloads.DiscoverVersionsRequestPayload{})
			if _, err := stdin.Write(ttlv.MarshalTTLV(&req)); err != nil {
				t.Fatal(err)
			}
			// -quiet keeps the session open after stdin ends, so read exactly
			// one TTLV message: 8-byte tag/type/length header, then the body.
			hdr := make([]byte, 8)
			if _, err := io.ReadFull(stdout, hdr); err != nil {
				t.Fatalf("no KMIP response through openssl s_client: %v", err)
			}
			body := make([]byte, binary.BigEndian.Uint32(hdr[4:]))
			if _, err := io.ReadFull(stdout, body); err != nil {
				t.Fatal(err)
			}
			var resp kmip.ResponseMessage
			if err := ttlv.UnmarshalTTLV(append(hdr, body...), &resp); err != nil {
				t.Fatal(err)
			}
			if len(resp.BatchItem) != 1 || resp.BatchItem[0].ResultStatus != kmip.ResultStatusSuccess {
				t.Fatalf("response: %+v", resp)
			}
			dv, ok := resp.BatchItem[0].ResponsePayload.(*payloads.DiscoverVersionsResponsePayload)
			if !ok || len(dv.ProtocolVersion) != 5 || dv.ProtocolVersion[0] != kmip.V1_4 {
				t.Fatalf("Discover Versions answer: %+v", resp.BatchItem[0].ResponsePayload)
			}
		})
	}
}

package kms

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/payloads"
	"github.com/ovh/kmip-go/ttlv"
)

// ServerStatus is the health of one KMIP server as seen by Status.
type ServerStatus struct {
	Address string `json:"address"`
	// Reachable: a TCP connection was established.
	Reachable bool `json:"reachable"`
	// ServerCertOK: the server's certificate verified against ca_file.
	ServerCertOK bool `json:"server_cert_ok"`
	// ClientCertOK: the server accepted our client certificate (a KMIP
	// request went through). With TLS 1.3 this is only known after the
	// first request, which is why Status always sends one.
	ClientCertOK bool `json:"client_cert_ok"`
	// TLSOK is ServerCertOK && ClientCertOK.
	TLSOK       bool   `json:"tls_ok"`
	TLSVersion  string `json:"tls_version,omitempty"`
	CipherSuite string `json:"cipher_suite,omitempty"`
	// KMIPVersion is the version negotiated by Discover Versions;
	// ServerVersions is the server's full answer.
	KMIPVersion    string   `json:"kmip_version,omitempty"`
	ServerVersions []string `json:"server_versions,omitempty"`
	// Vendor and ServerInfo come from Query (Server Information).
	Vendor     string `json:"vendor,omitempty"`
	ServerInfo string `json:"server_info,omitempty"`
	// Latency is the round trip of the Query request (not the handshake).
	Latency time.Duration `json:"latency"`
	// Error is empty when the server is fully usable.
	Error string `json:"error,omitempty"`
}

// Status checks every server of the provider on a fresh connection (not a
// pooled one, so the TLS handshake and version negotiation are really
// exercised): connect, TLS, Discover Versions, Query. It never fails as a
// whole; each server's problem is in its Error field, one line.
func (p *Provider) Status(ctx context.Context) []ServerStatus {
	out := make([]ServerStatus, len(p.servers))
	var wg sync.WaitGroup
	for i, s := range p.servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = s.status(ctx)
		}()
	}
	wg.Wait()
	return out
}

func (s *server) status(ctx context.Context) ServerStatus {
	st := ServerStatus{Address: s.addr}
	fail := func(err error) ServerStatus {
		err = classifyTransport(err)
		st.Error = (&Error{Provider: s.p.cfg.Name, Servers: []ServerError{{Addr: s.addr, Err: err}}}).Error()
		return st
	}
	var info handshakeInfo
	c, err := s.dial(ctx, &info)
	st.Reachable = info.tcpOK
	st.ServerCertOK = info.serverVerified
	if info.tlsOK {
		st.TLSVersion = tls.VersionName(info.tlsVers)
		st.CipherSuite = tls.CipherSuiteName(info.suite)
	}
	if err != nil {
		var te *transportError
		if errors.As(err, &te) {
			err = te.err
		}
		return fail(err)
	}
	defer c.client.Close()
	// The negotiation succeeded, so the server read our request: it
	// accepted the client certificate at the TLS layer.
	st.ClientCertOK = true
	st.KMIPVersion = c.client.Version().String()
	sess := &session{srv: s, c: c}

	// Ask again for the server's full version list (kmipclient keeps only
	// the chosen one). Servers that predate Discover Versions (KMIP 1.0)
	// answer "not supported", which is not a fault.
	if resp, err := sess.call(ctx, &payloads.DiscoverVersionsRequestPayload{}); err == nil {
		if dv, ok := resp.(*payloads.DiscoverVersionsResponsePayload); ok {
			for _, v := range dv.ProtocolVersion {
				st.ServerVersions = append(st.ServerVersions, v.String())
			}
		}
	} else if !errors.Is(err, ErrNotSupported) {
		if errors.Is(err, ErrClientCertRejected) {
			st.ClientCertOK = false
		}
		return fail(err)
	}

	start := time.Now()
	resp, err := sess.call(ctx, &payloads.QueryRequestPayload{QueryFunction: []kmip.QueryFunction{kmip.QueryFunctionServerInformation}})
	st.Latency = time.Since(start)
	if err != nil {
		if errors.Is(err, ErrClientCertRejected) {
			st.ClientCertOK = false
		}
		return fail(fmt.Errorf("query server information: %w", err))
	}
	if q, ok := resp.(*payloads.QueryResponsePayload); ok {
		st.Vendor = q.VendorIdentification
		if q.ServerInformation != nil {
			st.ServerInfo = flattenTTLV(*q.ServerInformation)
		}
	}
	st.TLSOK = st.ServerCertOK && st.ClientCertOK
	return st
}

// flattenTTLV renders a vendor-specific Server Information structure as
// "Tag=value, ..." for display.
func flattenTTLV(v ttlv.Value) string {
	var parts []string
	var walk func(v ttlv.Value)
	walk = func(v ttlv.Value) {
		switch x := v.Value.(type) {
		case ttlv.Struct:
			for _, f := range x {
				walk(f)
			}
		case []byte:
			parts = append(parts, fmt.Sprintf("%s=<%d bytes>", ttlv.TagString(v.Tag), len(x)))
		default:
			parts = append(parts, fmt.Sprintf("%s=%v", ttlv.TagString(v.Tag), x))
		}
	}
	walk(v)
	return strings.Join(parts, ", ")
}

package kms

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/ovh/kmip-go"
)

// DefaultPort is the IANA port for KMIP over TLS.
const DefaultPort = 5696

// Config describes one key provider (vCenter's "key provider" or "KMS
// cluster"): a name and one or more KMIP servers that hold the same keys.
// Servers are tried in the listed order; a failed server is moved to the
// back of the line for a short while, never dropped.
//
// The TOML tags follow github.com/BurntSushi/toml; durations are strings
// such as "10s" (time.ParseDuration).
//
//	[[kms]]
//	name      = "lab"
//	servers   = ["127.0.0.1:5696", "kms2.example:5696"]
//	ca_file   = "/etc/vmcryptd/kms/ca.pem"
//	cert_file = "/etc/vmcryptd/kms/client.pem"
//	key_file  = "/etc/vmcryptd/kms/client-key.pem"
//	timeout   = "10s"
type Config struct {
	// Name identifies the provider; it is written into every keySafe next
	// to the key id, so it must stay stable.
	Name string `toml:"name"`
	// Servers are "host:port" (port defaults to 5696), in failover order.
	Servers []string `toml:"servers"`

	// CAFile is a PEM bundle of the CAs that may sign the servers'
	// certificates. Required: trusting the system store for a KMS would let
	// any public CA vouch for a key server.
	CAFile string `toml:"ca_file"`
	// CertFile and KeyFile are the PEM client certificate and key presented
	// to the servers (mutual TLS). Required.
	CertFile string `toml:"cert_file"`
	KeyFile  string `toml:"key_file"`
	// ServerName overrides the name checked against the server certificates
	// (default: the host part of each server address).
	ServerName string `toml:"server_name"`
	// TLSCipherSuites adds TLS 1.2 suites by Go name (tls.CipherSuiteName),
	// for servers with RSA certificates that only speak CBC-SHA256 or RSA
	// key exchange suites (PyKMIP's TLS1.2 suite), e.g.
	// "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256". They are offered after Go's
	// defaults. Suites of tls.InsecureCipherSuites are allowed only by
	// being listed here (a warning is logged); unknown names are a config
	// error. Empty keeps Go's defaults. TLS 1.3 suites are not
	// configurable.
	TLSCipherSuites []string `toml:"tls_cipher_suites"`

	// KMIPVersions limits the protocol versions offered in Discover
	// Versions, e.g. ["1.1"]. Empty offers 1.4 down to 1.0 and lets the
	// server choose.
	KMIPVersions []string `toml:"kmip_versions"`

	// Timeout bounds one KMIP request/response (default 10s).
	Timeout time.Duration `toml:"timeout"`
	// ConnectTimeout bounds TCP connect + TLS handshake + Discover Versions
	// (default 5s).
	ConnectTimeout time.Duration `toml:"connect_timeout"`
	// Retries is how many more rounds over all servers are made after the
	// first round failed with connection-level errors (default 2; -1 for
	// none). Errors reported by a server (key not found, ...) are never
	// retried.
	Retries int `toml:"retries"`
	// RetryBackoff is the pause before the first retry round, doubled each
	// round up to 5s (default 250ms).
	RetryBackoff time.Duration `toml:"retry_backoff"`
	// PoolSize caps the open connections per server; idle ones are reused
	// (default 4).
	PoolSize int `toml:"pool_size"`
	// IdleTimeout closes pooled connections unused for this long (default
	// 30s); servers such as PyKMIP drop idle sessions on their side anyway.
	IdleTimeout time.Duration `toml:"idle_timeout"`
}

const (
	defaultTimeout        = 10 * time.Second
	defaultConnectTimeout = 5 * time.Second
	defaultRetries        = 2
	defaultRetryBackoff   = 250 * time.Millisecond
	maxRetryBackoff       = 5 * time.Second
	defaultPoolSize       = 4
	defaultIdleTimeout    = 30 * time.Second
)

// withDefaults returns a validated copy with defaults filled in and the
// server addresses normalised to host:port.
func (c Config) withDefaults() (Config, error) {
	var errs []string
	if strings.TrimSpace(c.Name) == "" {
		errs = append(errs, "name is empty")
	}
	if len(c.Servers) == 0 {
		errs = append(errs, "no servers")
	}
	servers := make([]string, 0, len(c.Servers))
	for _, s := range c.Servers {
		addr, err := normalizeAddr(s)
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		servers = append(servers, addr)
	}
	c.Servers = servers
	if c.CAFile == "" {
		errs = append(errs, "ca_file is empty")
	}
	if c.CertFile == "" || c.KeyFile == "" {
		errs = append(errs, "cert_file and key_file are required (KMIP servers authenticate clients by certificate)")
	}
	if _, err := parseVersions(c.KMIPVersions); err != nil {
		errs = append(errs, err.Error())
	}
	if err := CheckCipherSuites(c.TLSCipherSuites); err != nil {
		errs = append(errs, err.Error())
	}
	if c.Timeout < 0 || c.ConnectTimeout < 0 || c.RetryBackoff < 0 || c.IdleTimeout < 0 || c.PoolSize < 0 {
		errs = append(errs, "negative timeout, backoff or pool size")
	}
	if len(errs) > 0 {
		name := c.Name
		return c, fmt.Errorf("kms provider %q: invalid config: %s", name, strings.Join(errs, "; "))
	}
	if c.Timeout == 0 {
		c.Timeout = defaultTimeout
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = defaultConnectTimeout
	}
	switch {
	case c.Retries == 0:
		c.Retries = defaultRetries
	case c.Retries < 0:
		c.Retries = 0
	}
	if c.RetryBackoff == 0 {
		c.RetryBackoff = defaultRetryBackoff
	}
	if c.PoolSize == 0 {
		c.PoolSize = defaultPoolSize
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = defaultIdleTimeout
	}
	return c, nil
}

func normalizeAddr(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", errors.New("empty server address")
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		// No port: a bare host name or IP (IPv6 possibly in brackets).
		host = strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
		port = strconv.Itoa(DefaultPort)
	}
	if host == "" {
		return "", fmt.Errorf("server address %q has no host", s)
	}
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return "", fmt.Errorf("server address %q has an invalid port", s)
	}
	return net.JoinHostPort(host, port), nil
}

func parseVersions(vs []string) ([]kmip.ProtocolVersion, error) {
	var out []kmip.ProtocolVersion
	for _, v := range vs {
		major, minor, ok := strings.Cut(strings.TrimSpace(v), ".")
		ma, err1 := strconv.Atoi(major)
		mi, err2 := strconv.Atoi(minor)
		if !ok || err1 != nil || err2 != nil || ma != 1 || mi < 0 || mi > 4 {
			return nil, fmt.Errorf("kmip_versions: %q is not one of 1.0 to 1.4", v)
		}
		out = append(out, kmip.ProtocolVersion{ProtocolVersionMajor: int32(ma), ProtocolVersionMinor: int32(mi)})
	}
	return out, nil
}

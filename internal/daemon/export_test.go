package daemon

import "testing"

func TestExportListenRule(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		unix, tcp, cert, k, ca string
		ok                     bool
	}{
		{name: "unix", unix: "/run/x.sock", ok: true},
		{name: "relative unix", unix: "x.sock"},
		{name: "neither"},
		{name: "both", unix: "/run/x.sock", tcp: "127.0.0.1:10809", cert: "c", k: "k", ca: "a"},
		{name: "plain tcp", tcp: "127.0.0.1:10809"},
		{name: "tcp without client CA", tcp: "127.0.0.1:10809", cert: "c", k: "k"},
		{name: "tcp without key", tcp: "127.0.0.1:10809", cert: "c", ca: "a"},
		{name: "tcp mutual TLS", tcp: "127.0.0.1:10809", cert: "c", k: "k", ca: "a", ok: true},
		{name: "TLS files on unix", unix: "/run/x.sock", cert: "c", k: "k", ca: "a"},
	} {
		if msg := exportListenRule(tc.unix, tc.tcp, tc.cert, tc.k, tc.ca); (msg == "") != tc.ok {
			t.Errorf("%s: %q", tc.name, msg)
		}
	}
}

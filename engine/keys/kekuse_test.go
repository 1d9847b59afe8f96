package keys

import (
	"testing"
)

func TestKEKUse(t *testing.T) {
	for _, tc := range []struct {
		state        string
		unwrap, wrap bool
	}{
		{"", true, true}, // a KeyServer that hands out Active keys only
		{KEKActive, true, true},
		{KEKDeactivated, true, false},
		{KEKCompromised, true, false},
		{"Pre-Active", false, false},
		{"Destroyed", false, false},
		{"Destroyed Compromised", false, false},
		{"Unknown", false, false},
		{"active", false, false}, // exact KMIP spelling only
	} {
		unwrap, wrap := KekUse(tc.state)
		if unwrap != tc.unwrap || wrap != tc.wrap {
			t.Errorf("kekUse(%q) = unwrap %v, wrap %v; want %v, %v", tc.state, unwrap, wrap, tc.unwrap, tc.wrap)
		}
	}
}

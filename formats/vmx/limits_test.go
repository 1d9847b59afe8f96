package vmx

import (
	"strings"
	"testing"
)

func TestParseLimits(t *testing.T) {
	for _, tc := range []struct {
		name, text, err string
	}{
		{"lines at the limit", strings.Repeat("a = \"b\"\n", MaxLines), ""},
		{"100k lines", strings.Repeat("k = \"v\"\n", 100000), ""},
		{"too many lines", strings.Repeat("\n", MaxLines+1), "more than 131072 lines"},
		{"too large", strings.Repeat("#", MaxSize+1), "exceeds limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Parse([]byte(tc.text))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || string(f.Bytes()) != tc.text {
				t.Fatalf("round trip: %v", err)
			}
		})
	}
}

package daemon

import (
	"strings"
	"testing"
)

func TestNestedMount(t *testing.T) {
	cases := []struct {
		ds, mp string
		want   string // substring of the refusal; "" allows
	}{
		{"/srv/ds1", "/mnt/ds1", ""},
		{"/srv/ds1", "/srv/ds10", ""},
		{"/srv/ds10", "/srv/ds1", ""},
		{"/srv/ds1", "/srv/ds1", "inside the datastore"},
		{"/srv/ds1", "/srv/ds1/view", "inside the datastore"},
		{"/srv/ds1", "/srv/ds1/vm/deep/view", "inside the datastore"},
		{"/srv/ds1", "/srv", "inside the mountpoint"},
		{"/srv/ds1", "/", "inside the mountpoint"},
		{"/", "/mnt/x", "inside the datastore"},
	}
	for _, tc := range cases {
		got := nestedMount(tc.ds, tc.mp)
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("nestedMount(%q, %q) = %q, want %q", tc.ds, tc.mp, got, tc.want)
		}
	}
}

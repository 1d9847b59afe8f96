package fusefs

import "testing"

func TestFuseMountAt(t *testing.T) {
	const info = `22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
36 22 0:31 / /mnt/view rw,nosuid,nodev,relatime shared:1 - fuse.vmcryptd /data/ds rw,user_id=0,group_id=0
37 22 0:32 / /mnt/my\040view rw,relatime - fuse /data/ds rw,user_id=0
38 22 0:33 / /mnt/tmp rw,relatime - tmpfs tmpfs rw
39 22 0:34 / /mnt/blk rw,relatime shared:3 master:1 - fuseblk /dev/sdb1 rw
40 22 0:35 / /mnt/short rw
41 22 0:36 / /mnt/fusey rw - fusectl x rw
`
	cases := []struct {
		path string
		want bool
	}{
		{"/mnt/view", true},
		{"/mnt/view/", true},
		{"/mnt/my view", true},
		{"/mnt/tmp", false},
		{"/mnt/blk", true},
		{"/mnt/short", false},
		{"/mnt/fusey", false},
		{"/mnt/none", false},
		{"/proc", false},
	}
	for _, tc := range cases {
		if got := fuseMountAt([]byte(info), tc.path); got != tc.want {
			t.Errorf("fuseMountAt(%q) = %v, want %v", tc.path, got, tc.want)
		}
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/a\040b`: "/a b", `/a\011b`: "/a\tb", `/a\134b`: `/a\b`, `/plain`: "/plain", `/trail\04`: `/trail\04`, `/bad\08x`: `/bad\08x`,
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}

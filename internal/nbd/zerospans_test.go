package nbd

import (
	"reflect"
	"testing"
)

// TestZeroSpans: whole aligned zero blocks become holes, partial edge
// blocks and non-zero blocks data, runs merge, and the chunk cap turns
// the rest into data.
func TestZeroSpans(t *testing.T) {
	const B = preferredBlock
	// data(i) is 1 in block i of a buffer of n blocks, 0 elsewhere.
	buf := func(n int, data ...int) []byte {
		p := make([]byte, n*B)
		for _, i := range data {
			p[i*B+B/2] = 1
		}
		return p
	}
	alternating := make([]int, 0, 300)
	for i := 0; i < 600; i += 2 {
		alternating = append(alternating, i)
	}
	for _, tc := range []struct {
		name string
		p    []byte
		off  int64
		want []span
	}{
		{"all data", buf(4, 0, 1, 2, 3), 0, []span{{0, 4 * B, false}}},
		{"all zero", buf(4), 8 * B, []span{{8 * B, 4 * B, true}}},
		{"hole data hole", buf(5, 2), 0, []span{{0, 2 * B, true}, {2 * B, B, false}, {3 * B, 2 * B, true}}},
		{"data hole data", buf(4, 0, 3), B, []span{{B, B, false}, {2 * B, 2 * B, true}, {4 * B, B, false}}},
		// Unaligned: the partial first and last blocks are data even if zero.
		{"unaligned zero", make([]byte, 3*B), 100, []span{{100, B - 100, false}, {B, 2 * B, true}, {3 * B, 100, false}}},
		{"short", make([]byte, B-1), 0, []span{{0, B - 1, false}}},
		// Alternating data and zero blocks: 256 spans, then one data span.
		{"cap", buf(600, alternating...), 0, nil},
	} {
		got := zeroSpans(nil, tc.p, tc.off)
		if tc.name == "cap" {
			for i := range maxReadChunks {
				tc.want = append(tc.want, span{int64(i) * B, B, i%2 == 1})
			}
			tc.want = append(tc.want, span{maxReadChunks * B, (600 - maxReadChunks) * B, false})
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %+v, want %+v", tc.name, got, tc.want)
		}
		// The spans tile the buffer and holes read as zeros.
		pos := tc.off
		for _, s := range got {
			if s.off != pos {
				t.Errorf("%s: span at %d, want %d", tc.name, s.off, pos)
			}
			if s.hole {
				for _, x := range tc.p[s.off-tc.off : s.off-tc.off+s.n] {
					if x != 0 {
						t.Fatalf("%s: hole over data", tc.name)
					}
				}
			}
			pos += s.n
		}
		if pos != tc.off+int64(len(tc.p)) {
			t.Errorf("%s: spans end at %d", tc.name, pos)
		}
	}
}

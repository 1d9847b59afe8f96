package daemon

import (
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/vmcryptd/vmcryptd/fusefs"
	"github.com/vmcryptd/vmcryptd/internal/api"
)

func TestQuantileBound(t *testing.T) {
	bounds := []float64{1, 2, 4, 8}
	cases := []struct {
		name       string
		cumulative []uint64
		n          uint64
		q          float64
		want       float64
	}{
		{"empty", []uint64{0, 0, 0, 0}, 0, 0.5, 0},
		{"all in first", []uint64{10, 10, 10, 10}, 10, 0.99, 1},
		{"median in second", []uint64{4, 6, 10, 10}, 10, 0.5, 2},
		{"median exactly at edge", []uint64{5, 6, 10, 10}, 10, 0.5, 1},
		{"p99 in last", []uint64{90, 95, 98, 100}, 100, 0.99, 8},
		{"p99 beyond buckets", []uint64{90, 95, 98, 98}, 100, 0.99, -1},
		{"one sample", []uint64{0, 0, 1, 1}, 1, 0.01, 4},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := quantileBound(bounds, tc.cumulative, tc.n, tc.q); got != tc.want {
				t.Fatalf("quantileBound = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestViewMetricsSummary(t *testing.T) {
	v := newViewMetrics()
	if s := v.summary(); len(s) != 0 {
		t.Fatalf("fresh summary: %+v", s)
	}
	now := time.Now()
	for i := 0; i < 99; i++ {
		v.ObserveIO(fusefs.IORead, now.Add(-10*time.Microsecond))
	}
	v.ObserveIO(fusefs.IORead, now.Add(-300*time.Millisecond))
	v.ObserveOp(fusefs.OpGetattr, now)
	s := v.summary()
	if len(s) != 2 || s[0].Kind != "io" || s[0].Op != "read" || s[0].Count != 100 || s[1].Kind != "op" || s[1].Op != "getattr" || s[1].Count != 1 {
		t.Fatalf("summary: %+v", s)
	}
	// The one 300 ms read alone makes the mean at least 3 ms; how long
	// the others took depends on the machine.
	if r := s[0]; r.MeanMicros < 3000 || r.P50Micros < 16 || r.P50Micros > r.P99Micros {
		t.Fatalf("read summary: %+v", r)
	}
}

func TestSummarize(t *testing.T) {
	u64 := func(v uint64) *uint64 { return &v }
	f64 := func(v float64) *float64 { return &v }
	h := &dto.Histogram{
		SampleCount: u64(100),
		SampleSum:   f64(0.002), // 20 µs mean
		Bucket: []*dto.Bucket{
			{UpperBound: f64(8e-6), CumulativeCount: u64(10)},
			{UpperBound: f64(16e-6), CumulativeCount: u64(60)},
			{UpperBound: f64(32e-6), CumulativeCount: u64(98)},
			{UpperBound: f64(64e-6), CumulativeCount: u64(99)},
		},
	}
	got := summarize("io", "write", h)
	want := api.ViewLatency{Kind: "io", Op: "write", Count: 100, MeanMicros: 20, P50Micros: 16, P99Micros: 64}
	if got.Kind != want.Kind || got.Op != want.Op || got.Count != want.Count || got.P50Micros != want.P50Micros ||
		got.P99Micros != want.P99Micros || got.MeanMicros < 19.999 || got.MeanMicros > 20.001 {
		t.Fatalf("summarize = %+v, want %+v", got, want)
	}
}

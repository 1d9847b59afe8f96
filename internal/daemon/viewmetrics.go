package daemon

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/vmcryptd/vmcryptd/fusefs"
	"github.com/vmcryptd/vmcryptd/internal/api"
)

// viewBuckets span 2 µs (a cached getattr) to about 1 s (an fsync of a
// large dirty file), doubling.
var viewBuckets = prometheus.ExponentialBuckets(2e-6, 2, 20)

// viewMetrics are the latency histograms of every view the daemon
// serves, summed over mounts (no mountpoint label: paths can be
// sensitive). It implements fusefs.Observer; the per-label observers are
// resolved once, so a request costs no label lookup.
type viewMetrics struct {
	ops   *prometheus.HistogramVec
	ios   *prometheus.HistogramVec
	opObs [fusefs.NumOps]prometheus.Histogram
	ioObs [fusefs.NumIO]prometheus.Histogram
}

func newViewMetrics() *viewMetrics {
	v := &viewMetrics{
		ops: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vmcryptd_view_op_duration_seconds",
			Help:    "Time the decrypted views took to answer a FUSE request, by operation.",
			Buckets: viewBuckets,
		}, []string{"op"}),
		ios: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vmcryptd_view_io_duration_seconds",
			Help:    "Time the engine took for the data of one read, write or fsync request of an encrypted file (backing I/O plus XTS).",
			Buckets: viewBuckets,
		}, []string{"io"}),
	}
	for op := fusefs.Op(0); op < fusefs.NumOps; op++ {
		v.opObs[op] = v.ops.WithLabelValues(op.String()).(prometheus.Histogram)
	}
	for io := fusefs.IO(0); io < fusefs.NumIO; io++ {
		v.ioObs[io] = v.ios.WithLabelValues(io.String()).(prometheus.Histogram)
	}
	return v
}

func (v *viewMetrics) ObserveOp(op fusefs.Op, start time.Time) {
	if op < fusefs.NumOps {
		v.opObs[op].Observe(time.Since(start).Seconds())
	}
}

func (v *viewMetrics) ObserveIO(io fusefs.IO, start time.Time) {
	if io < fusefs.NumIO {
		v.ioObs[io].Observe(time.Since(start).Seconds())
	}
}

// summary is what `vmcryptd status` shows: every data path, then every
// FUSE operation, that has been seen since the daemon started.
func (v *viewMetrics) summary() []api.ViewLatency {
	var out []api.ViewLatency
	add := func(kind, name string, h prometheus.Histogram) {
		var m dto.Metric
		if err := h.Write(&m); err != nil || m.Histogram == nil || m.Histogram.GetSampleCount() == 0 {
			return
		}
		out = append(out, summarize(kind, name, m.Histogram))
	}
	for io := fusefs.IO(0); io < fusefs.NumIO; io++ {
		add("io", io.String(), v.ioObs[io])
	}
	for op := fusefs.Op(0); op < fusefs.NumOps; op++ {
		add("op", op.String(), v.opObs[op])
	}
	return out
}

func summarize(kind, name string, h *dto.Histogram) api.ViewLatency {
	n := h.GetSampleCount()
	var bounds []float64
	var counts []uint64
	for _, b := range h.GetBucket() {
		bounds = append(bounds, b.GetUpperBound())
		counts = append(counts, b.GetCumulativeCount())
	}
	return api.ViewLatency{
		Kind: kind, Op: name, Count: n,
		MeanMicros: h.GetSampleSum() / float64(n) * 1e6,
		P50Micros:  micros(quantileBound(bounds, counts, n, 0.50)),
		P99Micros:  micros(quantileBound(bounds, counts, n, 0.99)),
	}
}

// quantileBound is the upper bound of the histogram bucket that holds the
// q-quantile of n samples (cumulative counts per bucket, ascending
// bounds): the q-quantile is at most this. Past the last bucket it is
// -1 (JSON has no infinity); with no samples 0.
func quantileBound(bounds []float64, cumulative []uint64, n uint64, q float64) float64 {
	if n == 0 {
		return 0
	}
	rank := uint64(q*float64(n) + 0.999999999) // ceil, without float noise
	rank = max(rank, 1)
	for i, c := range cumulative {
		if c >= rank {
			return bounds[i]
		}
	}
	return -1
}

func micros(s float64) float64 {
	if s < 0 {
		return -1
	}
	return s * 1e6
}

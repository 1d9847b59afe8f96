package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the daemon's Prometheus series. They carry operation names,
// results and counts only: never key ids or paths (cardinality, and paths
// can be sensitive).
type metrics struct {
	reg        *prometheus.Registry
	requests   *prometheus.CounterVec
	keysCached prometheus.GaugeFunc
	keyErrors  prometheus.GaugeFunc
	revoked    prometheus.GaugeFunc
	converted  *prometheus.CounterVec
	view       *viewMetrics
}

func newMetrics(d *Daemon) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vmcryptd_api_requests_total", Help: "API requests by operation and result (ok, denied, error).",
	}, []string{"op", "result"})
	m.keysCached = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "vmcryptd_keys_cached", Help: "KEKs held in locked memory.",
	}, func() float64 { return float64(len(d.keyring.Refs())) })
	m.keyErrors = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "vmcryptd_keys_unavailable", Help: "KEKs needed but not fetchable from their key server.",
	}, func() float64 {
		d.mu.Lock()
		defer d.mu.Unlock()
		return float64(len(d.keyErrs))
	})
	m.revoked = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "vmcryptd_revoked_keys_in_use", Help: "KEKs held in a revoked KMIP state (Deactivated, Compromised): they unwrap only.",
	}, func() float64 { return float64(len(d.keyring.Revoked())) })
	m.converted = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vmcryptd_converted_bytes_total", Help: "Bytes converted by VM operations.",
	}, []string{"op"})
	m.view = newViewMetrics()
	m.reg.MustRegister(m.requests, m.keysCached, m.keyErrors, m.revoked, m.converted, m.view.ops, m.view.ios,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// serveMetrics serves /metrics on addr until ctx is done.
func (m *metrics) serve(ctx context.Context, ln net.Listener) error {
	ln = limitListener(ln, 16) // scrapers are few

	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// metricsListener is one running metrics HTTP listener.
type metricsListener struct {
	addr   string
	cancel context.CancelFunc
	done   chan struct{}
}

// listenMetrics binds addr at once (so a taken port is an error now, not
// later) and serves the metrics there until stop.
func (d *Daemon) listenMetrics(addr string) (*metricsListener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics_listen %s: %w", addr, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ml := &metricsListener{addr: addr, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(ml.done)
		if err := d.metrics.serve(ctx, ln); err != nil {
			d.log.Error("metrics listener failed", "addr", addr, "err", err)
		}
	}()
	return ml, nil
}

// stop closes the listener and waits for its server to end; nil is off.
func (ml *metricsListener) stop() {
	if ml == nil {
		return
	}
	ml.cancel()
	<-ml.done
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vmcryptd/vmcryptd/bench"
	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/xts"
)

type benchCmd struct {
	Unit      []int    `help:"Data-unit sizes in bytes." default:"512,4096"`
	Impl      []string `help:"Implementations to measure (default: all this CPU supports)."`
	Threads   []int    `help:"Thread counts (default: 1 and all cores)."`
	Seconds   float64  `help:"Seconds per measurement." default:"1"`
	JSON      bool     `help:"Print one JSON array instead of a table." name:"json"`
	NoOpenSSL bool     `help:"Do not run 'openssl speed' for reference figures." name:"no-openssl"`
	Convert   string   `help:"Instead of the cipher, measure in-place file encryption against cp in this directory (same filesystem)." type:"path" placeholder:"DIR"`
	ConvertMB int64    `help:"Size of the --convert test file in MiB." default:"1024" name:"convert-mib"`
}

func (b *benchCmd) Run(g *globals) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	chosen, err := container.ChooseImpl()
	if err != nil {
		return err
	}
	if b.Convert != "" {
		r, err := bench.MeasureConversion(ctx, b.Convert, b.ConvertMB<<20, 3)
		if err != nil {
			return err
		}
		if b.JSON {
			return printJSON(r)
		}
		fmt.Printf("in-place conversion of a %d MiB file in %s (best of 3, %s):\n", b.ConvertMB, b.Convert, chosen)
		fmt.Printf("  cp + fsync: %7.0f MB/s\n", r.CPBytesPerS/1e6)
		fmt.Printf("  encrypt:    %7.0f MB/s  (%.2fx cp)\n", r.EncBytesPerS/1e6, r.EncBytesPerS/r.CPBytesPerS)
		fmt.Printf("  decrypt:    %7.0f MB/s  (%.2fx cp)\n", r.DecBytesPerS/1e6, r.DecBytesPerS/r.CPBytesPerS)
		return nil
	}
	impls := xts.Available()
	if len(b.Impl) > 0 {
		impls = impls[:0:0]
		for _, name := range b.Impl {
			impl, err := xts.Choose(name)
			if err != nil {
				return fmt.Errorf("--impl: %w", err)
			}
			impls = append(impls, impl)
		}
	}
	threads := b.Threads
	if len(threads) == 0 {
		threads = []int{1}
		if n := runtime.NumCPU(); n > 1 {
			threads = append(threads, n)
		}
	}
	for _, th := range threads {
		if th < 1 {
			return fmt.Errorf("--threads: %d is not a positive number", th)
		}
	}
	if b.Seconds <= 0 {
		return fmt.Errorf("--seconds must be positive")
	}
	d := time.Duration(b.Seconds * float64(time.Second))

	if !b.JSON {
		fmt.Printf("CPU features: %s\n", strings.Join(xts.Features(), " "))
		fmt.Printf("Chosen implementation: %s (force with $%s or --impl)\n", chosen, container.EnvXTSImpl)
		fmt.Printf("Each call processes one data unit in a cached buffer, as 'openssl speed' does.\n\n")
	}
	results, err := bench.MeasureCipher(ctx, bench.CipherOptions{
		Impls: impls, Chosen: chosen, Units: b.Unit, Threads: threads, Duration: d,
	})
	if err != nil {
		return err
	}
	if !b.NoOpenSSL && bench.OpenSSLAvailable() {
		ref, err := bench.MeasureOpenSSL(ctx, b.Unit, threads, d)
		if err != nil {
			g.log.Warn("openssl reference not measured", "err", err)
		} else {
			results = append(results, ref...)
		}
	}
	if b.JSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(results)
	}
	return printBenchTable(results)
}

func printBenchTable(results []bench.Result) error {
	type key struct {
		op            string
		unit, threads int
	}
	ref := map[key]float64{}
	for _, r := range results {
		if r.Impl == "openssl" {
			ref[key{r.Op, r.Unit, r.Threads}] = r.BytesPerSec
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "impl\top\tunit\tthreads\tGB/s\tvs OpenSSL\t")
	for _, r := range results {
		name := r.Impl
		if r.Chosen {
			name += " *"
		}
		ratio := "-"
		if o, ok := ref[key{r.Op, r.Unit, r.Threads}]; ok && r.Impl != "openssl" {
			ratio = fmt.Sprintf("%.2fx", r.BytesPerSec/o)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%.2f\t%s\t\n", name, r.Op, r.Unit, r.Threads, r.BytesPerSec/1e9, ratio)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Println("\n* = the implementation vmcryptd uses on this machine")
	return nil
}

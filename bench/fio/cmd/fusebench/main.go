// Command fusebench mounts the fusefs view over a directory in which every
// file is an encrypted container under one random DEK (generated per run,
// never stored), and serves it until SIGTERM or SIGINT. It exists for
// bench/fio/compare.sh; it is not a way to run vmcryptd.
package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/fusefs"
)

// oneKey encrypts every file of the store with one DEK.
type oneKey struct {
	fusefs.Unpoliced
	root string
	dek  *keys.DEK
}

func (b *oneKey) Classify(rel string) (view.FileState, string, error) {
	return view.FileEncrypted, "", nil
}

func (b *oneKey) Open(rel string, readOnly bool) (*container.Container, error) {
	return container.OpenContainer(filepath.Join(b.root, rel), b.dek, readOnly, "")
}

func (b *oneKey) Create(rel string, perm os.FileMode) (*container.Container, bool, error) {
	c, err := container.CreateContainer(filepath.Join(b.root, rel), b.dek, container.CreateOptions{
		Kind:    container.KindOther,
		Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: "fusebench"},
		Perm:    perm & 0o777,
	})
	return c, err == nil, err
}

// plainStore serves everything as plain files.
type plainStore struct{ fusefs.Unpoliced }

func (plainStore) Classify(string) (view.FileState, string, error) {
	return view.FilePlain, "", nil
}
func (plainStore) Open(string, bool) (*container.Container, error) {
	return nil, errors.New("plain store has no containers")
}
func (plainStore) Create(string, os.FileMode) (*container.Container, bool, error) {
	return nil, false, nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "fusebench:", err)
		os.Exit(1)
	}
}

func run() error {
	var opts fusefs.Options
	store := flag.String("store", "", "backing directory (required)")
	mnt := flag.String("mnt", "", "mountpoint (required)")
	pidFile := flag.String("pidfile", "", "write the pid here once mounted")
	flag.IntVar(&opts.MaxWrite, "max-write", 0, "MaxWrite in bytes (0: default)")
	flag.BoolVar(&opts.NoWritebackCache, "no-writeback", false, "disable the kernel writeback cache")
	flag.IntVar(&opts.MaxBackground, "max-background", 0, "MaxBackground (0: default)")
	flag.IntVar(&opts.CongestionThreshold, "congestion", 0, "CongestionThreshold (0: 3/4 of MaxBackground)")
	flag.BoolVar(&opts.NoAsyncDIO, "no-async-dio", false, "do not negotiate asynchronous direct I/O")
	flag.IntVar(&opts.MaxReadAhead, "max-readahead", 0, "MaxReadAhead in bytes (0: default)")
	flag.IntVar(&opts.MaxInflightBytes, "max-inflight", 0, "go-fuse in-flight request bytes (0: default)")
	flag.DurationVar(&opts.AttrTimeout, "attr-timeout", 0, "attribute timeout (0: default, <0: none)")
	flag.DurationVar(&opts.EntryTimeout, "entry-timeout", 0, "entry timeout (0: default, <0: none)")
	flag.BoolVar(&opts.Debug, "debug", false, "log every FUSE request")
	flag.IntVar(&opts.ReadAheadKB, "readahead-kb", 0, "bdi read_ahead_kb (0: default, <0: kernel's)")
	flag.IntVar(&opts.MaxDirtyRatio, "max-ratio", 0, "bdi max_ratio percent (0: default, <0: kernel's)")
	flag.BoolVar(&opts.XAttr, "xattr", false, "pass extended attributes through")
	flag.BoolVar(&opts.Passthrough, "passthrough", false, "kernel passthrough for plain files (needs -no-writeback)")
	plain := flag.Bool("plain", false, "serve every file plain (no encryption): measures the FUSE path alone")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile here until exit")
	memProfile := flag.String("memprofile", "", "write an allocation profile here at exit")
	flag.Parse()
	if *store == "" || *mnt == "" {
		return errors.New("-store and -mnt are required")
	}
	level := slog.LevelInfo
	if opts.Debug {
		level = slog.LevelDebug
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	dek, err := keys.NewDEK()
	if err != nil {
		return err
	}
	defer dek.Destroy()
	var b fusefs.Backend = &oneKey{root: *store, dek: dek}
	if *plain {
		b = plainStore{}
	}
	v, err := fusefs.Mount(*store, *mnt, b, opts)
	if err != nil {
		return err
	}
	if *pidFile != "" {
		if err := os.WriteFile(*pidFile, fmt.Appendf(nil, "%d\n", os.Getpid()), 0o644); err != nil {
			v.Unmount(true)
			return err
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	// Give clients a moment to close, then force.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		err = v.Unmount(false)
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fusebench: forcing unmount:", err)
		if err := v.Unmount(true); err != nil {
			return err
		}
	}
	v.Wait()
	if *memProfile != "" {
		f, err := os.Create(*memProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
			return err
		}
	}
	return nil
}

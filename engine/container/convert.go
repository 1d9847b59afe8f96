package container

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// File conversions (plain -> container, container -> plain, container ->
// container under a new key) never modify the original: they write a
// temporary file beside it, fsync it, rename it over the original and
// fsync the directory. A crash or a full disk at any point leaves the
// original intact (and at worst a temporary file), so no data unit is
// ever overwritten before its replacement is durable.
//
// A temporary file is named TmpPrefix and 32 random hex digits, created
// with O_EXCL (never over an existing file). A VM conversion records the
// name in its journal before creating the file, and a later run removes
// only the names its journal records: a conversion never deletes a file
// it did not create, whatever the user named their files.

// TmpPrefix starts the name of a conversion's temporary file.
const TmpPrefix = ".vmcryptd-tmp-"

// TempFunc returns the temporary file to write path's replacement to
// (a path in the same directory that does not exist yet).
type TempFunc func(path string) (string, error)

// TempBase returns a fresh temporary file name.
func TempBase() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("crypto/rand: %w", err)
	}
	return TmpPrefix + hex.EncodeToString(b[:]), nil
}

// RandomTemp is the TempFunc of conversions without a journal.
func RandomTemp(path string) (string, error) {
	n, err := TempBase()
	if err != nil {
		return "", err
	}
	return filepath.Join(filepath.Dir(path), n), nil
}

func IsTempName(n string) bool { return strings.HasPrefix(n, TmpPrefix) }

// convChunk is the unit of the conversion pipeline: large enough to keep
// both cores busy encrypting, small enough to keep memory flat.
const convChunk = 4 << 20

// ProgressFunc is told how many more bytes of the current file are done.
type ProgressFunc func(n int64)

// dataRanges lists the [start, end) regions of f that hold data, using
// SEEK_DATA/SEEK_HOLE (filesystems without hole support report one region).
func dataRanges(f *os.File, size int64) ([][2]int64, error) {
	var out [][2]int64
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			return [][2]int64{{0, size}}, nil // no SEEK_DATA: treat all as data
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			end = size
		}
		end = min(end, size)
		if start < end {
			out = append(out, [2]int64{start, end})
		}
		off = end
	}
	return out, nil
}

// chunks splits data ranges into unit-aligned pieces of at most
// convChunk bytes. Pieces of neighbouring ranges may share a unit; such a
// unit is then written twice with the same content, which is harmless.
func chunks(ranges [][2]int64, align int64) [][2]int64 {
	var out [][2]int64
	for _, r := range ranges {
		for off := r[0] / align * align; off < r[1]; off += convChunk {
			n := min(int64(convChunk), r[1]-off)
			out = append(out, [2]int64{off, (n + align - 1) / align * align})
		}
	}
	return out
}

// runChunks processes pieces on one worker per core, each with its own
// buffer doing read, en/decrypt and write of a whole piece. Spreading
// whole pieces (rather than splitting each one) lets the kernel's copies
// in and out of the page cache run on every core too: they, not AES, are
// what a conversion spends its time on. read fills buf (zero-padding past
// EOF); process handles buf for the piece at off; progress gets the
// logical bytes done.
func runChunks(ctx context.Context, pieces [][2]int64, logical int64, read func(buf []byte, off int64) error,
	process func(buf []byte, off int64) error, progress ProgressFunc) error {
	workers := min(runtime.GOMAXPROCS(0), max(len(pieces), 1))
	// Buffers as large as the largest piece, not always a whole chunk: a
	// VM of thousands of small extents spent most of its conversion
	// clearing 4 MiB buffers it never filled.
	var biggest int64
	for _, p := range pieces {
		biggest = max(biggest, p[1])
	}
	// One goroutine per worker, each with its buffer, pulling pieces; the
	// first error cancels gctx, which stops the others at their next piece.
	var next atomic.Int64
	var progressMu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	for range workers {
		g.Go(func() error {
			buf := make([]byte, biggest)
			for {
				i := next.Add(1) - 1
				if i >= int64(len(pieces)) {
					return nil
				}
				if err := gctx.Err(); err != nil {
					return err
				}
				off, n := pieces[i][0], pieces[i][1]
				b := buf[:n]
				if err := read(b, off); err != nil {
					return err
				}
				if err := process(b, off); err != nil {
					return err
				}
				if progress != nil {
					done := min(n, max(logical-off, 0))
					progressMu.Lock()
					progress(done)
					progressMu.Unlock()
				}
			}
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return ctx.Err()
}

// readPadded reads len(buf) bytes at off, zero-filling past the end.
func readPadded(r io.ReaderAt, buf []byte, off int64) error {
	k, err := r.ReadAt(buf, off)
	if err == io.EOF || (err == nil && k < len(buf)) {
		clear(buf[k:])
		return nil
	}
	return err
}

// EncryptFile converts the plain file at path into a container.
func EncryptFile(ctx context.Context, path string, dek *keys.DEK, opts CreateOptions, progress ProgressFunc) error {
	return EncryptFileTemp(ctx, path, dek, opts, progress, RandomTemp)
}

func EncryptFileTemp(ctx context.Context, path string, dek *keys.DEK, opts CreateOptions, progress ProgressFunc, temp TempFunc) error {
	if _, err := CheckSource(path); err != nil {
		return fmt.Errorf("encrypt: %w", err)
	}
	src, err := safeopen.Open(path, os.O_RDONLY)
	if err != nil {
		return fmt.Errorf("encrypt %s: %w", path, err)
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return fmt.Errorf("encrypt %s: %w", path, err)
	}
	if opts.Perm == 0 {
		opts.Perm = st.Mode().Perm()
	}
	tmp, err := temp(path)
	if err != nil {
		return fmt.Errorf("encrypt %s: %w", path, err)
	}
	dst, err := CreateContainer(tmp, dek, opts)
	if err != nil {
		return fmt.Errorf("encrypt %s: %w", path, err)
	}
	ok := false
	defer func() {
		if !ok {
			dst.Close()
			os.Remove(tmp)
		}
	}()
	size := st.Size()
	if err := dst.Truncate(size); err != nil {
		return fmt.Errorf("encrypt %s: %w", path, err)
	}
	ranges, err := dataRanges(src, size)
	if err != nil {
		return fmt.Errorf("encrypt %s: %w", path, err)
	}
	unit := int64(dst.Header().UnitSize)
	dst.serial = true // runChunks already uses every core
	err = runChunks(ctx, chunks(ranges, unit), size,
		func(buf []byte, off int64) error { return readPadded(src, buf, off) },
		func(buf []byte, off int64) error { _, err := dst.writeUnits(buf, off); return err },
		progress)
	if err != nil {
		return fmt.Errorf("encrypt %s: %w", path, err)
	}
	// The reader also stops on cancellation; make sure that is an error.
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("encrypt %s: %w", path, err)
	}
	if err := finishConversion(dst, tmp, path, st); err != nil {
		return err
	}
	ok = true
	return nil
}

// finishConversion makes tmp durable and renames it over path.
func finishConversion(dst *Container, tmp, path string, st os.FileInfo) error {
	chownLike(dst.File(), st)
	if err := dst.Sync(); err != nil {
		return fmt.Errorf("convert %s: %w", path, err)
	}
	if err := dst.Close(); err != nil {
		return fmt.Errorf("convert %s: %w", path, err)
	}
	return replace(tmp, path, st)
}

// CheckSource refuses anything but a regular file with one link: a
// symlink would convert its target (outside the VM, maybe) and a second
// hard link would keep a plaintext copy under its other name.
func CheckSource(path string) (os.FileInfo, error) {
	st, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file (%s)", path, st.Mode().Type())
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Nlink > 1 {
		return nil, fmt.Errorf("%s has %d hard links; converting it would leave the other names behind", path, sys.Nlink)
	}
	return st, nil
}

// chownLike gives f the owner of st, by descriptor (never by path).
func chownLike(f *os.File, st os.FileInfo) {
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		f.Chown(int(sys.Uid), int(sys.Gid))
	}
}

func replace(tmp, path string, st os.FileInfo) error {
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("convert %s: %w", path, err)
	}
	return atomicfile.SyncDir(filepath.Dir(path))
}

// DecryptFile converts the container at path back to a plain file. Units
// that are holes in the container stay holes.
func DecryptFile(ctx context.Context, path string, dek *keys.DEK, progress ProgressFunc) error {
	return DecryptFileTemp(ctx, path, dek, progress, RandomTemp)
}

func DecryptFileTemp(ctx context.Context, path string, dek *keys.DEK, progress ProgressFunc, temp TempFunc) error {
	if _, err := CheckSource(path); err != nil {
		return fmt.Errorf("decrypt: %w", err)
	}
	src, err := OpenContainer(path, dek, true, "")
	if err != nil {
		return fmt.Errorf("decrypt: %w", err)
	}
	defer src.Close()
	st, err := src.File().Stat()
	if err != nil {
		return fmt.Errorf("decrypt %s: %w", path, err)
	}
	tmp, err := temp(path)
	if err != nil {
		return fmt.Errorf("decrypt %s: %w", path, err)
	}
	dst, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("decrypt %s: %w", path, err)
	}
	dst.Chmod(st.Mode().Perm())
	chownLike(dst, st)
	ok := false
	defer func() {
		if !ok {
			dst.Close()
			os.Remove(tmp)
		}
	}()
	if err := copyPlain(ctx, src, func(p []byte, off int64) error {
		_, err := dst.WriteAt(p, off)
		return err
	}, progress); err != nil {
		return fmt.Errorf("decrypt %s: %w", path, err)
	}
	if err := dst.Truncate(src.Size()); err != nil {
		return fmt.Errorf("decrypt %s: %w", path, err)
	}
	if err := dst.Sync(); err != nil {
		return fmt.Errorf("decrypt %s: fsync: %w", path, err)
	}
	if err := dst.Close(); err != nil {
		return fmt.Errorf("decrypt %s: %w", path, err)
	}
	if err := replace(tmp, path, st); err != nil {
		return err
	}
	ok = true
	return nil
}

// RekeyFile re-encrypts the container at path under newDEK (a deep rekey).
func RekeyFile(ctx context.Context, path string, oldDEK, newDEK *keys.DEK, opts CreateOptions, progress ProgressFunc) error {
	return RekeyFileTemp(ctx, path, oldDEK, newDEK, opts, progress, RandomTemp)
}

func RekeyFileTemp(ctx context.Context, path string, oldDEK, newDEK *keys.DEK, opts CreateOptions, progress ProgressFunc, temp TempFunc) error {
	if _, err := CheckSource(path); err != nil {
		return fmt.Errorf("rekey: %w", err)
	}
	src, err := OpenContainer(path, oldDEK, true, "")
	if err != nil {
		return fmt.Errorf("rekey: %w", err)
	}
	defer src.Close()
	st, err := src.File().Stat()
	if err != nil {
		return fmt.Errorf("rekey %s: %w", path, err)
	}
	h := src.Header()
	if opts.Kind == 0 {
		opts.Kind = h.Kind
	}
	if opts.UnitSize == 0 {
		opts.UnitSize = h.UnitSize
	}
	if opts.Perm == 0 {
		opts.Perm = st.Mode().Perm()
	}
	tmp, err := temp(path)
	if err != nil {
		return fmt.Errorf("rekey %s: %w", path, err)
	}
	dst, err := CreateContainer(tmp, newDEK, opts)
	if err != nil {
		return fmt.Errorf("rekey %s: %w", path, err)
	}
	ok := false
	defer func() {
		if !ok {
			dst.Close()
			os.Remove(tmp)
		}
	}()
	if err := dst.Truncate(src.Size()); err != nil {
		return fmt.Errorf("rekey %s: %w", path, err)
	}
	if err := copyPlain(ctx, src, func(p []byte, off int64) error {
		_, err := dst.writeUnits(p, off)
		return err
	}, progress); err != nil {
		return fmt.Errorf("rekey %s: %w", path, err)
	}
	if err := finishConversion(dst, tmp, path, st); err != nil {
		return err
	}
	ok = true
	return nil
}

// copyPlain streams the plaintext of the data regions of src to write,
// skipping units that are holes in the backing file.
func copyPlain(ctx context.Context, src *Container, write func(p []byte, off int64) error, progress ProgressFunc) error {
	size := src.Size()
	bst, err := src.File().Stat()
	if err != nil {
		return err
	}
	back, err := dataRanges(src.File(), bst.Size())
	if err != nil {
		return err
	}
	unit := int64(src.Header().UnitSize)
	var ranges [][2]int64
	for _, r := range back {
		s, e := max(r[0]-HeaderSize, 0), min(r[1]-HeaderSize, size)
		if r[1] <= HeaderSize || s >= e {
			continue
		}
		ranges = append(ranges, [2]int64{s / unit * unit, e})
	}
	src.serial = true
	return runChunks(ctx, chunks(ranges, unit), size,
		func(buf []byte, off int64) error { return readPadded(src, buf, off) },
		func(buf []byte, off int64) error {
			n := min(int64(len(buf)), size-off)
			if n <= 0 {
				return nil
			}
			return write(buf[:n], off)
		},
		progress)
}

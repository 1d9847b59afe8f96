// Package fusefs serves a FUSE view of a datastore directory in which
// encrypted containers (docs/FORMAT.md) appear decrypted at their logical
// size, and everything else passes through as in a loopback file system.
//
// Which files are encrypted is the Backend's decision; fusefs only
// translates FUSE operations. Encrypted files are always served by this
// package's own file handles, which call container.Container: they are never
// handed to go-fuse's LoopbackFile or to kernel passthrough, either of
// which would bypass decryption and expose ciphertext.
package fusefs

import (
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"syscall"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
)

// Backend decides which files are encrypted, opens and creates them, and
// holds the policy the view enforces. rel is the slash path relative to
// the datastore root. *view.Datastore is the product's Backend; every
// method is required, so no safeguard can go missing by a method left
// out (benchmarks and tests that want none embed Unpoliced, by name).
type Backend interface {
	// Classify tells how to serve an existing regular file. For
	// view.FileLocked, reason says why (a key not in memory, or a
	// refusal naming its FORMAT.md 5 clause); the view answers EACCES
	// and logs reason.
	Classify(rel string) (st view.FileState, reason string, err error)
	// Open opens an encrypted file (view.FileEncrypted). readOnly
	// opens it O_RDONLY.
	Open(rel string, readOnly bool) (*container.Container, error)
	// Create makes a new file at rel. encrypted=false means the caller
	// should create a plain file itself; otherwise the returned container
	// is the new (empty) encrypted file. The backend decides (files
	// created inside an encrypted VM's directory are encrypted).
	Create(rel string, perm os.FileMode) (c *container.Container, encrypted bool, err error)

	// WouldEncrypt says, without creating anything, whether a new file
	// at rel would be encrypted. The view refuses (EXDEV) a rename or
	// hard link that would move a plain file into an encrypted directory
	// or a container out of one: tools such as mv then fall back to copy
	// + delete, which goes through Create and so encrypts (or decrypts)
	// the data instead of leaving plaintext among encrypted files.
	WouldEncrypt(rel string) (bool, error)

	// Unsettled reports, without I/O, whether rel may need settling;
	// only then does the view sync and call Settle.
	Unsettled(rel string) bool
	// Settle gives a written file its final form: a new VMDK descriptor
	// made as a container becomes plain text naming its disk key. The
	// view calls it when the last handle of an encrypted file that was
	// open for writing is flushed (close(2)), after syncing its
	// container. isOpen says whether a file of the view is open;
	// unchanged reports, right before a replacement, that rel has not
	// been written since the view synced it (false: try later). The
	// returned files were replaced on disk; the view stops serving them
	// from its caches.
	Settle(rel string, isOpen func(rel string) bool, unchanged func() bool) (replaced []string, err error)

	// MayOpen refuses opening plain files, e.g. those of a VM in the
	// middle of a conversion, which is about to replace them (encrypted
	// files are refused by Open and Create, new files by Create). An
	// error wrapping view.ErrBusy becomes EBUSY.
	MayOpen(rel string) error
	// MayTruncate refuses cutting a plain file (O_TRUNC, truncate(2),
	// ftruncate(2)): a VMDK descriptor holding a disk's key lines is
	// replaced by rename, never truncated in place, or the disk would
	// lose its key (view.ErrKeyLines becomes EPERM).
	MayTruncate(rel string) error
}

// Unpoliced is the policy half of Backend for benchmarks and tests that
// need none: no file would be encrypted by a move, nothing needs
// settling, nothing is busy. A product backend never embeds it.
type Unpoliced struct{}

func (Unpoliced) WouldEncrypt(string) (bool, error) { return false, nil }
func (Unpoliced) Unsettled(string) bool             { return false }
func (Unpoliced) Settle(string, func(string) bool, func() bool) ([]string, error) {
	return nil, nil
}
func (Unpoliced) MayOpen(string) error     { return nil }
func (Unpoliced) MayTruncate(string) error { return nil }

var _ Backend = (*view.Datastore)(nil)

// Options tune a mount. The zero value gives the measured defaults (see
// the package README in bench/fio for the numbers behind them).
type Options struct {
	// ReadOnly mounts read-only and opens containers O_RDONLY.
	ReadOnly bool
	// AllowOther lets users other than the mounting one (root) use the
	// view. The mount always uses default_permissions, so the kernel
	// enforces the backing files' modes for them.
	AllowOther bool
	// Logger receives one line per refused open (locked, damaged) and per
	// I/O error. nil means slog.Default().
	Logger *slog.Logger

	// MaxWrite is the largest READ/WRITE request; 0 means 1 MiB (the
	// kernel maximum).
	MaxWrite int
	// NoWritebackCache turns the kernel writeback cache off. With it on
	// (the default), buffered writes are collected in the page cache and
	// sent as large requests, and O_APPEND and the file size are kept by
	// the kernel. Off, every write(2) is one synchronous request; kernel
	// passthrough for plain files needs it off (the kernel refuses both).
	NoWritebackCache bool
	// Passthrough asks the kernel to serve plain files' reads and writes
	// directly from the backing file (needs NoWritebackCache). Encrypted
	// files never use it.
	Passthrough bool
	// MaxBackground is how many asynchronous requests (readahead,
	// writeback, and with asynchronous direct I/O the O_DIRECT requests
	// of aio and io_uring callers) the kernel keeps in flight; 0 means
	// DefaultMaxBackground.
	MaxBackground int
	// CongestionThreshold is the number of asynchronous requests in
	// flight at which the kernel reports the mount congested; 0 means
	// 3/4 of MaxBackground (the kernel's convention).
	CongestionThreshold int
	// NoAsyncDIO keeps the kernel from sending the O_DIRECT requests of
	// one aio or io_uring submission (and the pieces of one large
	// O_DIRECT request) to the view concurrently. On (the default), a
	// caller with 32 requests queued (QEMU with aio=native or io_uring)
	// has up to MaxBackground of them served at once instead of one at a
	// time.
	NoAsyncDIO bool
	// MaxReadAhead caps kernel readahead in bytes; 0 means the kernel's
	// maximum for the mount (MaxWrite).
	MaxReadAhead int
	// AttrTimeout and EntryTimeout are how long the kernel caches
	// attributes and names; 0 means 1s, negative means no caching.
	AttrTimeout, EntryTimeout time.Duration
	// ReadAheadKB sets the mount's kernel readahead window
	// (/sys/class/bdi/<dev>/read_ahead_kb); the kernel starts FUSE mounts
	// at 128 KiB whatever MaxReadAhead says. 0 means DefaultReadAheadKB,
	// negative leaves the kernel's value.
	ReadAheadKB int
	// MaxDirtyRatio sets the share (percent) of the system's dirty-page
	// limit that this mount may use (/sys/class/bdi/<dev>/max_ratio); the
	// kernel gives FUSE mounts 1%, and raising it measured no faster, so
	// 0 leaves the kernel's value.
	MaxDirtyRatio int
	// XAttr passes extended attributes through. Off (the default), the
	// view answers ENOSYS once and the kernel stops asking, which saves a
	// round trip (security.capability) on every write(2).
	XAttr bool
	// MaxInflightBytes bounds the request buffers go-fuse holds at once
	// (memory); 0 means DefaultMaxInflightBytes.
	MaxInflightBytes int
	// Observer, if set, receives the latency of every request (see
	// Observer); the daemon exports them as Prometheus histograms.
	Observer Observer
	// Debug logs every FUSE request (very verbose).
	Debug bool
}

// Defaults chosen by measurement (bench/fio).
const (
	DefaultMaxWrite         = 1 << 20
	DefaultMaxBackground    = 16
	DefaultMaxInflightBytes = 32 << 20
	DefaultReadAheadKB      = 2048
	defaultTimeout          = time.Second
)

// errnoTable is the view's one mapping of engine and OS errors to the
// errno its callers see, first match wins (after an errno the error
// already carries). TestErrnoTable checks every row.
var errnoTable = []struct {
	err   error
	errno syscall.Errno
}{
	{view.ErrBusy, syscall.EBUSY},            // the VM is being converted
	{container.ErrDegraded, syscall.EROFS},   // readers get the surviving slot
	{vm.ErrRefused, syscall.EACCES},          // a refusal of FORMAT.md 5
	{keys.ErrKeyUnavailable, syscall.EACCES}, // the KEK is not in memory
	{view.ErrKeyLines, syscall.EPERM},        // truncating a descriptor's key lines
	{container.ErrTooLarge, syscall.EFBIG},   // past a container's 2^62 bytes
	{fs.ErrNotExist, syscall.ENOENT},
	{fs.ErrPermission, syscall.EACCES},
	{fs.ErrExist, syscall.EEXIST},
}

// errnoOf maps an error from the engine or the OS to the errno the caller
// of the view sees (errnoTable). Unknown errors become EIO: the view never
// invents a more hopeful answer than "the data could not be had".
func errnoOf(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	for _, row := range errnoTable {
		if errors.Is(err, row.err) {
			return row.errno
		}
	}
	return syscall.EIO
}

package view

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// BlockDisk is a virtual disk of a datastore opened as one block device
// (the NBD export): the decrypted bytes the guest sees, not its files.
// Its files are opened exactly as a view opens them (Datastore.Classify
// and Datastore.Open: the same trust rules, FORMAT.md section 5, and the
// same refusal while the VM converts), so it serves what a view would
// serve and refuses what a view refuses. It is writable only for flat
// layouts (monolithicFlat, twoGbMaxExtentFlat, vmfs): every virtual byte
// then maps to one byte of one extent file. Sparse and streamOptimized
// disks, delta disks and disks with ZERO or read-only extents are served
// read-only. Safe for concurrent use.
type BlockDisk struct {
	path      string
	disk      *vmdk.Disk
	exts      []blockExtent // for writes; nil when read-only
	files     []blockFile   // every file opened (a descriptor is closed once read)
	readOnly  bool
	closeOnce sync.Once
}

type blockExtent struct {
	start, length int64
	fileOff       int64
	file          blockFile // nil: not writable
}

// blockFile is an extent or descriptor file a BlockDisk opened.
type blockFile interface {
	vmdk.File
	WriteAt(p []byte, off int64) (int, error)
	Sync() error
	PunchHole(off, n int64) error
}

// ErrBlockReadOnly refuses writes to a read-only BlockDisk.
var ErrBlockReadOnly = fmt.Errorf("disk is exported read-only: %w", syscall.EROFS)

// BlockWritable says whether a disk of these extents can be written
// through a BlockDisk, and if not why: only flat extents with read-write
// access map virtual bytes one to one onto file bytes, and a delta disk
// would need its parent's data copied into new grains.
func BlockWritable(exts []vmdk.ExtentInfo, hasParent bool) (bool, string) {
	if hasParent {
		return false, "it is a delta disk (snapshot)"
	}
	if len(exts) == 0 {
		return false, "it has no extents"
	}
	for i, e := range exts {
		switch {
		case !strings.EqualFold(e.Type, vmdk.ExtentFlat) && !strings.EqualFold(e.Type, vmdk.ExtentVMFS):
			return false, fmt.Sprintf("extent %d is %s, not flat (sparse grains would have to be allocated)", i, e.Type)
		case !strings.EqualFold(e.Access, vmdk.AccessRW):
			return false, fmt.Sprintf("extent %d has access %s", i, e.Access)
		}
	}
	return true, ""
}

// OpenBlockDisk opens the disk whose descriptor (or single-file sparse
// disk) is rel. readOnly=false fails, with the reason, for a disk that
// cannot be written (BlockWritable), and for files a view would open
// read-only only (a degraded container, a revoked key).
func (d *Datastore) OpenBlockDisk(rel string, readOnly bool) (*BlockDisk, error) {
	path, err := d.abs(rel)
	if err != nil {
		return nil, err
	}
	if !vm.IsVMDKName(path) {
		return nil, fmt.Errorf("%s: not a .vmdk disk", path)
	}
	bd, err := d.openBlockDisk(path, true)
	if err != nil || readOnly {
		return bd, err
	}
	ok, why := BlockWritable(bd.disk.Extents(), bd.disk.Parent() != nil)
	bd.Close()
	if !ok {
		return nil, fmt.Errorf("%s: cannot be exported read-write: %s; export it read-only", path, why)
	}
	return d.openBlockDisk(path, false)
}

func (d *Datastore) openBlockDisk(path string, readOnly bool) (*BlockDisk, error) {
	bd := &BlockDisk{path: path, readOnly: readOnly}
	var mu sync.Mutex
	opener := func(p string) (vmdk.File, error) {
		f, err := d.openBlockFile(p, readOnly)
		if err != nil {
			return nil, err
		}
		mu.Lock()
		bd.files = append(bd.files, f)
		mu.Unlock()
		return f, nil
	}
	disk, err := vmdk.Open(path, &vmdk.Options{Open: opener})
	if err != nil {
		return nil, err
	}
	bd.disk = disk
	if readOnly {
		return bd, nil
	}
	byPath := map[string]blockFile{}
	for _, f := range bd.files {
		if n, ok := f.(interface{ Name() string }); ok {
			byPath[n.Name()] = f
		}
	}
	for i, e := range disk.Extents() {
		f := byPath[e.Path]
		if f == nil {
			disk.Close()
			return nil, fmt.Errorf("%s: extent %d (%s) was not opened", path, i, e.Path)
		}
		bd.exts = append(bd.exts, blockExtent{start: e.Start, length: e.Sectors * vmdk.SectorSize, fileOff: e.Offset * vmdk.SectorSize, file: f})
	}
	return bd, nil
}

// openBlockFile opens one file of a disk as a view would: a container
// the VM's text files say belongs there under its key, a plain file as
// plain, anything refused (a plain file where a container belongs, a
// locked key) with the view's reason.
func (d *Datastore) openBlockFile(p string, readOnly bool) (blockFile, error) {
	rel, err := filepath.Rel(d.root, p)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return nil, fmt.Errorf("%s: outside the datastore %s", p, d.root)
	}
	cl, err := d.classify(rel)
	if err != nil {
		return nil, err
	}
	switch cl.state {
	case FileLocked:
		var ref *vm.RefusedError
		if errors.As(cl.why, &ref) {
			return nil, cl.why
		}
		return nil, fmt.Errorf("%s: %w: %s", p, keys.ErrKeyUnavailable, cl.why)
	case FileEncrypted:
		c, err := d.Open(rel, readOnly)
		if err != nil {
			return nil, err
		}
		return containerFile{c}, nil
	}
	if err := d.MayOpen(rel); err != nil {
		return nil, err
	}
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := safeopen.Open(p, flag)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	pf := &plainBlockFile{File: f}
	pf.size.Store(fi.Size())
	return pf, nil
}

// containerFile is a Container as a blockFile.
type containerFile struct{ *container.Container }

func (c containerFile) Name() string { return c.Path() }

func (c containerFile) PunchHole(off, n int64) error { return c.Container.PunchHole(off, n) }

// plainBlockFile is a plain extent file; its size follows its writes so
// reads past the old end see the data written there.
type plainBlockFile struct {
	*os.File
	size atomic.Int64
}

func (f *plainBlockFile) Size() int64 { return f.size.Load() }

func (f *plainBlockFile) WriteAt(p []byte, off int64) (int, error) {
	n, err := f.File.WriteAt(p, off)
	for end := off + int64(n); ; {
		cur := f.size.Load()
		if end <= cur || f.size.CompareAndSwap(cur, end) {
			break
		}
	}
	return n, err
}

func (f *plainBlockFile) Sync() error { return unix.Fdatasync(int(f.Fd())) }

func (f *plainBlockFile) PunchHole(off, n int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if errors.Is(err, syscall.EOPNOTSUPP) {
		_, err = f.WriteAt(make([]byte, n), off)
	}
	if err != nil {
		return fmt.Errorf("punch hole %s: %w", f.Name(), err)
	}
	return nil
}

// NextData implements vmdk.DataMapper by SEEK_DATA/SEEK_HOLE.
func (f *plainBlockFile) NextData(off int64) (int64, int64, error) {
	size := f.Size()
	fd := int(f.Fd())
	b, err := unix.Seek(fd, off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, syscall.ENXIO):
		return size, size, nil
	case errors.Is(err, syscall.EINVAL):
		return off, size, nil
	case err != nil:
		return 0, 0, err
	}
	h, err := unix.Seek(fd, b, unix.SEEK_HOLE)
	if err != nil {
		return 0, 0, err
	}
	return b, h, nil
}

// Path is the descriptor path the disk was opened with.
func (b *BlockDisk) Path() string { return b.path }

// Size is the virtual disk's size in bytes.
func (b *BlockDisk) Size() int64 { return b.disk.Size() }

// ReadOnly reports whether writes are refused.
func (b *BlockDisk) ReadOnly() bool { return b.readOnly }

// CreateType is the descriptor's createType ("" for a bare sparse file).
func (b *BlockDisk) CreateType() string { return b.disk.CreateType() }

// Files lists every file the disk holds open: descriptor, extents and
// those of its parents.
func (b *BlockDisk) Files() []string {
	out := []string{b.path}
	for d := b.disk; d != nil; d = d.Parent() {
		out = append(out, d.Path())
		out = append(out, d.ExtentFiles()...)
	}
	sort.Strings(out)
	return compactStrings(out)
}

func compactStrings(s []string) []string {
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

// ReadAt reads virtual disk bytes.
func (b *BlockDisk) ReadAt(p []byte, off int64) (int, error) { return b.disk.ReadAt(p, off) }

// each calls fn for the parts of [off, off+n) in each extent.
func (b *BlockDisk) each(off, n int64, fn func(e blockExtent, fileOff, done, l int64) error) error {
	if b.readOnly {
		return fmt.Errorf("%s: %w", b.path, ErrBlockReadOnly)
	}
	if off < 0 || n < 0 || off > b.Size() || n > b.Size()-off {
		return fmt.Errorf("%s: range [%d, +%d) outside the disk: %w", b.path, off, n, syscall.EINVAL)
	}
	i := sort.Search(len(b.exts), func(i int) bool { return b.exts[i].start+b.exts[i].length > off })
	for done := int64(0); done < n; i++ {
		if i >= len(b.exts) {
			return fmt.Errorf("%s: offset %d beyond the extents", b.path, off+done)
		}
		e := b.exts[i]
		pos := off + done
		l := min(n-done, e.start+e.length-pos)
		if l <= 0 {
			continue
		}
		if err := fn(e, e.fileOff+pos-e.start, done, l); err != nil {
			return err
		}
		done += l
	}
	return nil
}

// WriteAt writes virtual disk bytes to the extents they map to.
func (b *BlockDisk) WriteAt(p []byte, off int64) (int, error) {
	written := 0
	err := b.each(off, int64(len(p)), func(e blockExtent, fo, done, l int64) error {
		n, err := e.file.WriteAt(p[done:done+l], fo)
		written += n
		return err
	})
	return written, err
}

// WriteAtInPlace is WriteAt for a caller that hands p over: encrypted
// extents encrypt it in place (Container.WriteAtInPlace), saving a copy
// of the request. p's contents are undefined afterwards.
func (b *BlockDisk) WriteAtInPlace(p []byte, off int64) (int, error) {
	written := 0
	err := b.each(off, int64(len(p)), func(e blockExtent, fo, done, l int64) error {
		var n int
		var err error
		if c, ok := e.file.(containerFile); ok {
			n, err = c.WriteAtInPlace(p[done:done+l], fo)
		} else {
			n, err = e.file.WriteAt(p[done:done+l], fo)
		}
		written += n
		return err
	})
	return written, err
}

// Zero makes a range read as zeros: whole data units become holes when
// punch is set, the rest is written as zeros.
func (b *BlockDisk) Zero(off, n int64, punch bool) error {
	return b.each(off, n, func(e blockExtent, fo, _, l int64) error {
		if punch {
			return e.file.PunchHole(fo, l)
		}
		zero := make([]byte, min(l, 1<<20))
		for w := int64(0); w < l; {
			k := min(l-w, int64(len(zero)))
			if _, err := e.file.WriteAt(zero[:k], fo+w); err != nil {
				return err
			}
			w += k
		}
		return nil
	})
}

// Flush makes every completed write durable (data, then container
// headers).
func (b *BlockDisk) Flush() error {
	if b.readOnly {
		return nil
	}
	var errs []error
	synced := map[blockFile]bool{}
	for _, e := range b.exts {
		if synced[e.file] {
			continue
		}
		synced[e.file] = true
		if err := e.file.Sync(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// BlockRun is a stretch of the disk with one allocation state.
type BlockRun struct {
	Length int64
	Zero   bool // reads as zeros without stored data
}

// Map describes [off, off+n) by allocation (holes of flat extents,
// unallocated grains, ZERO extents); it may cover less than n.
func (b *BlockDisk) Map(off, n int64) ([]BlockRun, error) {
	runs, err := b.disk.Map(off, n)
	if err != nil {
		return nil, err
	}
	out := make([]BlockRun, len(runs))
	for i, r := range runs {
		out[i] = BlockRun{r.Length, r.Zero}
	}
	return out, nil
}

// Close flushes and closes every file (containers zero their keys).
func (b *BlockDisk) Close() error {
	var err error
	b.closeOnce.Do(func() {
		err = errors.Join(b.Flush(), b.disk.Close())
	})
	return err
}

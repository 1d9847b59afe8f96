package vmdk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// File is an open extent (or descriptor) file. The engine substitutes
// decrypting implementations for encrypted extents, so the Disk never
// touches the file system except through an Opener.
type File interface {
	io.ReaderAt
	io.Closer
	// Size is the logical size of the file in bytes.
	Size() int64
}

// AllocationReporter is optionally implemented by a File that can tell how
// many bytes of a range are backed by storage (e.g. via SEEK_DATA).
type AllocationReporter interface {
	AllocatedBytes(off, n int64) (int64, error)
}

// Opener opens the file at path (an extent or the descriptor itself). The
// path has already passed ResolveExtentPath.
type Opener func(path string) (File, error)

// Options configures Open. The zero value is ready to use.
type Options struct {
	// Open opens extent files. When nil, files are opened read-only
	// beneath the descriptor's directory with OpenIn: a symbolic link is
	// never followed, a FIFO or device is refused without blocking.
	Open Opener
}

// maxParentDepth bounds delta-disk chains (VMware allows 32 snapshots).
const maxParentDepth = 32

// maxDiskGDEntries bounds the grain directory entries a Disk holds over
// all its sparse extents and parents (16 MiB), so that a descriptor
// naming one hostile extent thousands of times cannot multiply it.
const maxDiskGDEntries = 2 * maxGDEntries

// Disk is a virtual disk: a descriptor and its extents, readable as one
// flat byte range. It is safe for concurrent ReadAt calls.
type Disk struct {
	path     string
	desc     *Descriptor
	embedded bool
	exts     []*extent
	size     int64
	parent   *Disk
	files    []File
	gdLeft   *int64 // grain directory entries the disk chain may still load
}

type extent struct {
	Extent
	path   string // resolved path; "" for ZERO
	start  int64  // virtual byte offset
	length int64
	file   File
	sparse *SparseExtent
}

// ExtentInfo describes one extent of an open Disk.
type ExtentInfo struct {
	Extent
	Path            string // resolved file path; "" for ZERO extents
	Start           int64  // virtual byte offset where the extent begins
	FileSize        int64  // size of the extent file
	GrainSize       int64  // bytes; 0 for flat and zero extents
	StreamOptimized bool
}

// ResolveExtentPath joins dir with a file name taken from a descriptor (an
// extent or a parent hint). Absolute names and names with a ".." element
// are rejected: a descriptor must not reach outside the VM directory.
func ResolveExtentPath(dir, name string) (string, error) {
	switch {
	case name == "":
		return "", errors.New("empty file name")
	case strings.ContainsRune(name, 0):
		return "", fmt.Errorf("file name %q contains NUL", name)
	case filepath.IsAbs(name) || strings.HasPrefix(name, "/"):
		return "", fmt.Errorf("file name %q is absolute; only names relative to the VM directory are allowed", name)
	}
	for _, el := range strings.Split(name, "/") {
		if el == ".." {
			return "", fmt.Errorf("file name %q contains \"..\"; only names inside the VM directory are allowed", name)
		}
	}
	return filepath.Join(dir, filepath.Clean(name)), nil
}

// Open opens the disk whose descriptor is at path. path may also be a
// monolithicSparse or streamOptimized file with an embedded descriptor, or
// a single sparse extent without one.
func Open(path string, opts *Options) (*Disk, error) {
	left := int64(maxDiskGDEntries)
	return open(path, opts, 0, &left)
}

func open(path string, opts *Options, depth int, gdLeft *int64) (_ *Disk, err error) {
	dir := filepath.Dir(path)
	opener := defaultOpener(dir)
	if opts != nil && opts.Open != nil {
		opener = opts.Open
	}
	d := &Disk{path: path, gdLeft: gdLeft}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	f, err := opener(path)
	if err != nil {
		return nil, err
	}
	d.files = append(d.files, f)
	head := make([]byte, min(f.Size(), SectorSize))
	if _, err := f.ReadAt(head, 0); err != nil && err != io.EOF {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if IsSparse(head) {
		if err := d.openEmbedded(f); err != nil {
			return nil, err
		}
	} else {
		if err := d.openDescriptor(f, dir, opener); err != nil {
			return nil, err
		}
	}
	for _, e := range d.exts {
		d.size += e.length
	}
	if d.desc != nil {
		if err := d.openParent(dir, opts, depth); err != nil {
			return nil, err
		}
	}
	return d, nil
}

func (d *Disk) openEmbedded(f File) error {
	s, err := d.openSparse(f, d.path)
	if err != nil {
		return err
	}
	text, err := s.EmbeddedDescriptor()
	if err != nil {
		return err
	}
	if text != nil {
		if d.desc, err = ParseDescriptor(text); err != nil {
			return fmt.Errorf("%s: embedded %w", d.path, err)
		}
		d.embedded = true
	}
	// qemu and VMware use the file itself as the only extent, whatever
	// name the embedded descriptor gives (the file may have been renamed).
	e := &extent{
		Extent: Extent{Access: AccessRW, Sectors: int64(s.hdr.Capacity), Type: ExtentSparse, Filename: filepath.Base(d.path)},
		path:   d.path, length: s.Size(), file: f, sparse: s,
	}
	if d.desc != nil {
		if xs := d.desc.Extents(); len(xs) == 1 {
			e.Extent = xs[0]
			e.length = xs[0].Sectors * SectorSize
		}
	}
	d.exts = []*extent{e}
	return nil
}

func (d *Disk) openDescriptor(f File, dir string, opener Opener) error {
	if f.Size() > MaxDescriptorSize {
		return fmt.Errorf("%s: descriptor: %d bytes exceeds limit of %d", d.path, f.Size(), MaxDescriptorSize)
	}
	text := make([]byte, f.Size())
	if _, err := f.ReadAt(text, 0); err != nil && err != io.EOF {
		return fmt.Errorf("%s: %w", d.path, err)
	}
	d.files[0].Close()
	d.files = d.files[:0]
	desc, err := ParseDescriptor(text)
	if err != nil {
		return fmt.Errorf("%s: %w", d.path, err)
	}
	d.desc = desc
	var start int64
	for i, x := range desc.Extents() {
		e := &extent{Extent: x, start: start, length: x.Sectors * SectorSize}
		if start > (1<<63-1)-e.length {
			return fmt.Errorf("%s: descriptor: extent %d: disk size overflows", d.path, i)
		}
		start += e.length
		d.exts = append(d.exts, e)
		switch strings.ToUpper(x.Type) {
		case ExtentZero:
			continue
		case ExtentFlat, ExtentVMFS, ExtentSparse:
		default:
			return fmt.Errorf("%s: descriptor: extent %d: type %s not supported for reading", d.path, i, x.Type)
		}
		p, err := ResolveExtentPath(dir, x.Filename)
		if err != nil {
			return fmt.Errorf("%s: descriptor: extent %d: %w", d.path, i, err)
		}
		e.path = p
		ef, err := opener(p)
		if err != nil {
			return fmt.Errorf("%s: descriptor: extent %d: %w", d.path, i, err)
		}
		d.files = append(d.files, ef)
		e.file = ef
		if strings.EqualFold(x.Type, ExtentSparse) {
			if e.sparse, err = d.openSparse(ef, p); err != nil {
				return err
			}
		}
	}
	return nil
}

// openSparse opens a sparse extent and charges its grain directory to
// the disk chain's budget.
func (d *Disk) openSparse(f File, name string) (*SparseExtent, error) {
	s, err := OpenSparse(f, f.Size(), name)
	if err != nil {
		return nil, err
	}
	if *d.gdLeft -= int64(len(s.gd)); *d.gdLeft < 0 {
		return nil, fmt.Errorf("%s: grain directories of the disk's sparse extents exceed %d entries in all", name, maxDiskGDEntries)
	}
	return s, nil
}

func (d *Disk) openParent(dir string, opts *Options, depth int) error {
	hint, ok := d.desc.ParentFileNameHint()
	if !ok || hint == "" {
		return nil
	}
	if pcid, err := d.desc.ParentCID(); err == nil && pcid == 0xffffffff {
		return nil
	}
	if depth >= maxParentDepth {
		return fmt.Errorf("%s: parentFileNameHint: chain deeper than %d", d.path, maxParentDepth)
	}
	p, err := ResolveExtentPath(dir, hint)
	if err != nil {
		return fmt.Errorf("%s: parentFileNameHint: %w", d.path, err)
	}
	parent, err := open(p, opts, depth+1, d.gdLeft)
	if err != nil {
		return fmt.Errorf("%s: parent: %w", d.path, err)
	}
	d.parent = parent
	if parent.desc == nil {
		return nil
	}
	want, err1 := d.desc.ParentCID()
	got, err2 := parent.desc.CID()
	if err1 == nil && err2 == nil && want != got {
		return fmt.Errorf("%s: parentCID %08x does not match CID %08x of parent %s", d.path, want, got, p)
	}
	return nil
}

// Close closes every file the disk opened, including its parents'.
func (d *Disk) Close() error {
	var errs []error
	for _, f := range d.files {
		errs = append(errs, f.Close())
	}
	d.files = nil
	if d.parent != nil {
		errs = append(errs, d.parent.Close())
		d.parent = nil
	}
	return errors.Join(errs...)
}

// Path returns the path the disk was opened with.
func (d *Disk) Path() string { return d.path }

// Descriptor returns the parsed descriptor (embedded or separate), or nil
// for a bare sparse extent without one.
func (d *Disk) Descriptor() *Descriptor { return d.desc }

// EmbeddedDescriptor reports whether the descriptor lives inside a sparse
// extent.
func (d *Disk) EmbeddedDescriptor() bool { return d.embedded }

// CreateType returns the createType of the descriptor ("" if none).
func (d *Disk) CreateType() string {
	if d.desc == nil {
		return ""
	}
	return d.desc.CreateType()
}

// Size returns the virtual size in bytes.
func (d *Disk) Size() int64 { return d.size }

// Parent returns the parent disk of a delta disk, or nil.
func (d *Disk) Parent() *Disk { return d.parent }

// Extents describes the extents in order.
func (d *Disk) Extents() []ExtentInfo {
	out := make([]ExtentInfo, len(d.exts))
	for i, e := range d.exts {
		out[i] = ExtentInfo{Extent: e.Extent, Path: e.path, Start: e.start}
		if e.file != nil {
			out[i].FileSize = e.file.Size()
		}
		if e.sparse != nil {
			out[i].GrainSize = e.sparse.GrainBytes()
			out[i].StreamOptimized = e.sparse.hdr.StreamOptimized()
		}
	}
	return out
}

// ExtentFiles returns the distinct files holding the disk's data (not the
// parent's), in extent order.
func (d *Disk) ExtentFiles() []string {
	var out []string
	seen := map[string]bool{}
	for _, e := range d.exts {
		if e.path != "" && !seen[e.path] {
			seen[e.path] = true
			out = append(out, e.path)
		}
	}
	return out
}

// AllocatedBytes returns how many bytes of extent i hold data: for sparse
// extents the allocated grains times the grain size (zeroed grains do not
// count), for flat extents the bytes of the extent's range that are backed
// by storage when the file can tell (AllocationReporter), else the part of
// the range that lies inside the file. ZERO extents have none.
func (d *Disk) AllocatedBytes(i int) (int64, error) {
	if i < 0 || i >= len(d.exts) {
		return 0, fmt.Errorf("%s: no extent %d", d.path, i)
	}
	e := d.exts[i]
	switch {
	case e.file == nil:
		return 0, nil
	case e.sparse != nil:
		n, _, err := e.sparse.GrainCounts()
		return n * e.sparse.GrainBytes(), err
	}
	off := e.Offset * SectorSize
	n := max(min(e.length, e.file.Size()-off), 0)
	if ar, ok := e.file.(AllocationReporter); ok && n > 0 {
		return ar.AllocatedBytes(off, n)
	}
	return n, nil
}

// ReadAt reads virtual disk bytes. Holes read as zeros (or as the parent's
// data for a delta disk). A read past the end returns io.EOF.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: negative offset %d", d.path, off)
	}
	if off >= d.size {
		return 0, io.EOF
	}
	want := len(p)
	if int64(want) > d.size-off {
		p = p[:d.size-off]
	}
	done := 0
	i := sort.Search(len(d.exts), func(i int) bool { return d.exts[i].start+d.exts[i].length > off })
	for ; done < len(p) && i < len(d.exts); i++ {
		e := d.exts[i]
		pos := off + int64(done)
		if e.length == 0 || pos < e.start {
			continue
		}
		within := pos - e.start
		n := min(int64(len(p)-done), e.length-within)
		if err := d.readExtent(e, p[done:done+int(n)], within); err != nil {
			return done, err
		}
		done += int(n)
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

func (d *Disk) readExtent(e *extent, dst []byte, within int64) error {
	switch {
	case e.file == nil:
		clear(dst)
		return nil
	case e.sparse != nil:
		var hole holeFunc
		if d.parent != nil {
			hole = func(p []byte, off int64) error { return d.readParent(p, e.start+off) }
		}
		n, err := e.sparse.readAt(dst, within, hole)
		if err == io.EOF {
			// The header's capacity is smaller than the descriptor's
			// extent: the rest is a hole.
			if hole != nil {
				return hole(dst[n:], within+int64(n))
			}
			clear(dst[n:])
			return nil
		}
		return err
	}
	fileOff := e.Offset*SectorSize + within
	avail := max(min(int64(len(dst)), e.file.Size()-fileOff), 0)
	if avail > 0 {
		if _, err := e.file.ReadAt(dst[:avail], fileOff); err != nil && err != io.EOF {
			return fmt.Errorf("%s: %w", e.path, err)
		}
	}
	// A flat file shorter than its extent reads as zeros past its end,
	// as qemu does.
	clear(dst[avail:])
	return nil
}

func (d *Disk) readParent(p []byte, off int64) error {
	n, err := d.parent.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

// osFile is the default File: a read-only *os.File with its size.
type osFile struct {
	*os.File
	size int64
}

func (f *osFile) Size() int64 { return f.size }

// defaultOpener opens regular files read-only beneath dir with OpenIn:
// no symbolic link is followed and a FIFO never blocks.
func defaultOpener(dir string) Opener {
	return func(path string) (File, error) {
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return nil, err
		}
		f, st, err := OpenIn(dir, rel)
		if err != nil {
			return nil, err
		}
		return &osFile{File: f, size: st.Size()}, nil
	}
}

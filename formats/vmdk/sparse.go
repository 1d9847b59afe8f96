package vmdk

import (
	"bytes"
	"compress/flate"
	"compress/zlib"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// SectorSize is the VMDK sector size; every offset in descriptors and
// sparse headers counts these.
const SectorSize = 512

// Sparse header flags (VMware Virtual Disk Format 5.0, "Hosted Sparse
// Extent Header").
const (
	FlagValidNewlineTest = 1 << 0  // the newline-detection bytes are valid
	FlagRedundantGT      = 1 << 1  // a redundant grain directory exists
	FlagZeroedGrainGTE   = 1 << 2  // GTE 1 means "grain reads as zeros"
	FlagCompressed       = 1 << 16 // grains are compressed
	FlagMarkers          = 1 << 17 // stream-optimized markers are present
)

// Compression algorithms of the compressAlgorithm header field.
const (
	CompressNone    = 0
	CompressDeflate = 1
)

// GDAtEnd in the header's gdOffset means the real offset is in the footer
// at the end of a stream-optimized file.
const GDAtEnd = ^uint64(0)

// gteZeroed is the grain table entry of a zeroed grain (with FlagZeroedGrainGTE).
const gteZeroed = 1

// Limits that keep a hostile header from making us allocate without bound.
const (
	maxGrainSize = 1 << 14 // sectors (8 MiB); VMware and qemu use 128 (64 KiB)
	maxGTEsPerGT = 512     // the format fixes 512; qemu refuses more
	maxCachedGTs = 4096    // 8 MiB of grain tables per extent
	maxGDEntries = 1 << 21 // 8 MiB of directory: 64 TiB at 64 KiB grains (VMware's limit is 62 TB)
)

// SparseHeader is the 512-byte header of a hosted sparse extent ("KDMV").
// The trailing pad is kept so that MarshalBinary reproduces the input.
type SparseHeader struct {
	Version            uint32
	Flags              uint32
	Capacity           uint64 // sectors
	GrainSize          uint64 // sectors
	DescriptorOffset   uint64 // sectors; 0 when no embedded descriptor
	DescriptorSize     uint64 // sectors
	NumGTEsPerGT       uint32
	RGDOffset          uint64 // sectors
	GDOffset           uint64 // sectors, or GDAtEnd
	OverHead           uint64 // sectors of metadata before the first grain
	UncleanShutdown    uint8
	SingleEndLineChar  byte // '\n'
	NonEndLineChar     byte // ' '
	DoubleEndLineChar1 byte // '\r'
	DoubleEndLineChar2 byte // '\n'
	CompressAlgorithm  uint16
	pad                [433]byte
}

var sparseMagic = [4]byte{'K', 'D', 'M', 'V'}

// IsSparse reports whether b starts with the hosted sparse magic.
func IsSparse(b []byte) bool { return len(b) >= 4 && [4]byte(b[:4]) == sparseMagic }

// ParseSparseHeader decodes a header. It checks the magic and the fields
// that do not depend on the file (version, grain size, table size);
// offsets are checked against the file by OpenSparse.
func ParseSparseHeader(b []byte) (*SparseHeader, error) {
	if len(b) < SectorSize {
		return nil, fmt.Errorf("sparse header: %d bytes, want %d", len(b), SectorSize)
	}
	if !IsSparse(b) {
		return nil, fmt.Errorf("sparse header: bad magic %q", b[:4])
	}
	le := binary.LittleEndian
	h := &SparseHeader{
		Version:            le.Uint32(b[4:]),
		Flags:              le.Uint32(b[8:]),
		Capacity:           le.Uint64(b[12:]),
		GrainSize:          le.Uint64(b[20:]),
		DescriptorOffset:   le.Uint64(b[28:]),
		DescriptorSize:     le.Uint64(b[36:]),
		NumGTEsPerGT:       le.Uint32(b[44:]),
		RGDOffset:          le.Uint64(b[48:]),
		GDOffset:           le.Uint64(b[56:]),
		OverHead:           le.Uint64(b[64:]),
		UncleanShutdown:    b[72],
		SingleEndLineChar:  b[73],
		NonEndLineChar:     b[74],
		DoubleEndLineChar1: b[75],
		DoubleEndLineChar2: b[76],
		CompressAlgorithm:  le.Uint16(b[77:]),
	}
	copy(h.pad[:], b[79:SectorSize])
	if h.Version < 1 || h.Version > 3 {
		return nil, fmt.Errorf("sparse header: version %d unsupported", h.Version)
	}
	if h.GrainSize == 0 || h.GrainSize > maxGrainSize || h.GrainSize&(h.GrainSize-1) != 0 {
		return nil, fmt.Errorf("sparse header: grain size %d sectors invalid", h.GrainSize)
	}
	if h.NumGTEsPerGT == 0 || h.NumGTEsPerGT > maxGTEsPerGT {
		return nil, fmt.Errorf("sparse header: numGTEsPerGT %d invalid", h.NumGTEsPerGT)
	}
	if h.Capacity > maxSectors {
		return nil, fmt.Errorf("sparse header: capacity %d sectors too large", h.Capacity)
	}
	if h.GDEntries() > maxGDEntries {
		return nil, fmt.Errorf("sparse header: grain directory of %d entries too large", h.GDEntries())
	}
	if h.Flags&FlagValidNewlineTest != 0 && (h.SingleEndLineChar != '\n' || h.NonEndLineChar != ' ' || h.DoubleEndLineChar1 != '\r' || h.DoubleEndLineChar2 != '\n') {
		// These bytes exist to catch a transfer that rewrote line endings.
		return nil, fmt.Errorf("sparse header: newline detection bytes %q damaged (file copied in text mode?)",
			[]byte{h.SingleEndLineChar, h.NonEndLineChar, h.DoubleEndLineChar1, h.DoubleEndLineChar2})
	}
	if h.Flags&FlagCompressed != 0 && h.CompressAlgorithm != CompressDeflate {
		return nil, fmt.Errorf("sparse header: compression algorithm %d unsupported", h.CompressAlgorithm)
	}
	return h, nil
}

// MarshalBinary encodes the header into 512 bytes.
func (h *SparseHeader) MarshalBinary() ([]byte, error) {
	b := make([]byte, SectorSize)
	le := binary.LittleEndian
	copy(b, sparseMagic[:])
	le.PutUint32(b[4:], h.Version)
	le.PutUint32(b[8:], h.Flags)
	le.PutUint64(b[12:], h.Capacity)
	le.PutUint64(b[20:], h.GrainSize)
	le.PutUint64(b[28:], h.DescriptorOffset)
	le.PutUint64(b[36:], h.DescriptorSize)
	le.PutUint32(b[44:], h.NumGTEsPerGT)
	le.PutUint64(b[48:], h.RGDOffset)
	le.PutUint64(b[56:], h.GDOffset)
	le.PutUint64(b[64:], h.OverHead)
	b[72] = h.UncleanShutdown
	b[73], b[74], b[75], b[76] = h.SingleEndLineChar, h.NonEndLineChar, h.DoubleEndLineChar1, h.DoubleEndLineChar2
	le.PutUint16(b[77:], h.CompressAlgorithm)
	copy(b[79:], h.pad[:])
	return b, nil
}

// GDEntries is the number of grain directory entries the capacity needs.
func (h *SparseHeader) GDEntries() uint64 {
	span := h.GrainSize * uint64(h.NumGTEsPerGT) // ≤ 2^32, no overflow
	if span == 0 {
		return 0
	}
	return (h.Capacity + span - 1) / span
}

// StreamOptimized reports whether grains are compressed behind markers.
func (h *SparseHeader) StreamOptimized() bool {
	return h.Flags&FlagCompressed != 0 || h.Flags&FlagMarkers != 0
}

// SparseExtent reads one hosted sparse extent file (monolithicSparse,
// twoGbMaxExtentSparse, streamOptimized). It is safe for concurrent use.
type SparseExtent struct {
	r      io.ReaderAt
	size   int64  // file size
	name   string // for error messages
	hdr    SparseHeader
	footer bool // header came from the footer
	gd     []uint32

	mu  sync.Mutex
	gts map[uint32][]uint32
	// One decompressed grain, because streams are mostly read sequentially
	// and a grain (64 KiB) is larger than most requests.
	cacheLBA uint64
	cache    []byte
}

// OpenSparse parses the header (and, for stream-optimized files with the
// directory at the end, the footer) and loads the grain directory. Every
// offset is checked against size. name is used in error messages.
func OpenSparse(r io.ReaderAt, size int64, name string) (*SparseExtent, error) {
	if size < SectorSize {
		return nil, fmt.Errorf("%s: sparse header: file size %d smaller than one sector", name, size)
	}
	buf := make([]byte, SectorSize)
	if _, err := r.ReadAt(buf, 0); err != nil {
		return nil, fmt.Errorf("%s: sparse header: %w", name, err)
	}
	h, err := ParseSparseHeader(buf)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	s := &SparseExtent{r: r, size: size, name: name, gts: map[uint32][]uint32{}}
	if h.GDOffset == GDAtEnd {
		fh, err := readFooter(r, size, name)
		if err != nil {
			return nil, err
		}
		// The footer is authoritative except for the embedded descriptor,
		// which only the header locates.
		fh.DescriptorOffset, fh.DescriptorSize = h.DescriptorOffset, h.DescriptorSize
		h, s.footer = fh, true
	}
	s.hdr = *h
	if err := s.validate(); err != nil {
		return nil, err
	}
	if err := s.loadGD(); err != nil {
		return nil, err
	}
	return s, nil
}

// readFooter reads the footer of a stream-optimized file: a footer marker,
// a copy of the header with the real gdOffset, and an end-of-stream marker,
// in the last three sectors.
func readFooter(r io.ReaderAt, size int64, name string) (*SparseHeader, error) {
	if size < 4*SectorSize {
		return nil, fmt.Errorf("%s: stream footer: file size %d too small for a footer", name, size)
	}
	b := make([]byte, 3*SectorSize)
	if _, err := r.ReadAt(b, size-3*SectorSize); err != nil {
		return nil, fmt.Errorf("%s: stream footer: %w", name, err)
	}
	le := binary.LittleEndian
	if le.Uint32(b[8:]) != 0 || MarkerType(le.Uint32(b[12:])) != MarkerFooter {
		return nil, fmt.Errorf("%s: stream footer: no footer marker at offset %d", name, size-3*SectorSize)
	}
	eos := b[2*SectorSize:]
	if le.Uint64(eos) != 0 || le.Uint32(eos[8:]) != 0 || MarkerType(le.Uint32(eos[12:])) != MarkerEOS {
		return nil, fmt.Errorf("%s: stream footer: no end-of-stream marker at offset %d", name, size-SectorSize)
	}
	h, err := ParseSparseHeader(b[SectorSize : 2*SectorSize])
	if err != nil {
		return nil, fmt.Errorf("%s: stream footer: %w", name, err)
	}
	if h.GDOffset == GDAtEnd {
		return nil, fmt.Errorf("%s: stream footer: grain directory offset still unset", name)
	}
	return h, nil
}

// fits reports whether length bytes at sector off lie inside the file.
func (s *SparseExtent) fits(off uint64, length int64) bool {
	if off > uint64(s.size)/SectorSize {
		return false
	}
	return int64(off)*SectorSize+length <= s.size
}

func (s *SparseExtent) validate() error {
	h := &s.hdr
	gdBytes := int64(h.GDEntries()) * 4
	if h.GDOffset == 0 && h.GDEntries() > 0 {
		return fmt.Errorf("%s: sparse header: grain directory offset is 0", s.name)
	}
	if !s.fits(h.GDOffset, gdBytes) {
		return fmt.Errorf("%s: sparse header: grain directory at sector %d (%d bytes) beyond file size %d", s.name, h.GDOffset, gdBytes, s.size)
	}
	if h.Flags&FlagRedundantGT != 0 && !s.fits(h.RGDOffset, gdBytes) {
		return fmt.Errorf("%s: sparse header: redundant grain directory at sector %d beyond file size %d", s.name, h.RGDOffset, s.size)
	}
	if err := s.checkDescriptorArea(); err != nil {
		return err
	}
	if !s.fits(h.OverHead, 0) {
		return fmt.Errorf("%s: sparse header: overhead %d sectors beyond file size %d", s.name, h.OverHead, s.size)
	}
	return nil
}

// checkDescriptorArea checks that the embedded descriptor area is
// bounded and inside the file.
func (s *SparseExtent) checkDescriptorArea() error {
	h := &s.hdr
	if h.DescriptorSize == 0 {
		return nil
	}
	if h.DescriptorOffset == 0 || h.DescriptorSize > MaxDescriptorSize/SectorSize {
		return fmt.Errorf("%s: sparse header: descriptor at sector %d size %d invalid", s.name, h.DescriptorOffset, h.DescriptorSize)
	}
	if !s.fits(h.DescriptorOffset, int64(h.DescriptorSize)*SectorSize) {
		return fmt.Errorf("%s: sparse header: descriptor at sector %d beyond file size %d", s.name, h.DescriptorOffset, s.size)
	}
	return nil
}

func (s *SparseExtent) loadGD() error {
	n := int(s.hdr.GDEntries()) // ≤ maxGDEntries
	s.gd = make([]uint32, n)
	// Read in pieces: the directory is held once, as []uint32.
	b := make([]byte, min(n*4, 64<<10))
	gtBytes := int64(s.hdr.NumGTEsPerGT) * 4
	base := int64(s.hdr.GDOffset) * SectorSize
	for i := 0; i < n; {
		k := min(n-i, len(b)/4)
		if _, err := s.r.ReadAt(b[:4*k], base+4*int64(i)); err != nil {
			return fmt.Errorf("%s: grain directory: %w", s.name, err)
		}
		for j := range k {
			v := binary.LittleEndian.Uint32(b[4*j:])
			if v != 0 && !s.fits(uint64(v), gtBytes) {
				return fmt.Errorf("%s: grain directory: entry %d: grain table at sector %d beyond file size %d", s.name, i+j, v, s.size)
			}
			s.gd[i+j] = v
		}
		i += k
	}
	return nil
}

// Header returns the effective header (the footer's, for streams that keep
// the directory at the end).
func (s *SparseExtent) Header() SparseHeader { return s.hdr }

// Size returns the virtual size of the extent in bytes.
func (s *SparseExtent) Size() int64 { return int64(s.hdr.Capacity) * SectorSize }

// GrainBytes returns the grain size in bytes.
func (s *SparseExtent) GrainBytes() int64 { return int64(s.hdr.GrainSize) * SectorSize }

// EmbeddedDescriptor returns the descriptor text stored inside the extent
// (up to the first NUL), or nil if there is none.
func (s *SparseExtent) EmbeddedDescriptor() ([]byte, error) {
	h := s.hdr
	if h.DescriptorSize == 0 {
		return nil, nil
	}
	b := make([]byte, h.DescriptorSize*SectorSize)
	if _, err := s.r.ReadAt(b, int64(h.DescriptorOffset)*SectorSize); err != nil {
		return nil, fmt.Errorf("%s: embedded descriptor: %w", s.name, err)
	}
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return b, nil
}

// ReadEmbeddedDescriptor returns the descriptor text embedded in the
// sparse extent r of size bytes (up to the first NUL; nil if it has none),
// reading only the header and the descriptor area: unlike OpenSparse it
// does not load the grain directory. name is used in error messages.
func ReadEmbeddedDescriptor(r io.ReaderAt, size int64, name string) ([]byte, error) {
	if size < SectorSize {
		return nil, fmt.Errorf("%s: sparse header: file size %d smaller than one sector", name, size)
	}
	buf := make([]byte, SectorSize)
	if _, err := r.ReadAt(buf, 0); err != nil {
		return nil, fmt.Errorf("%s: sparse header: %w", name, err)
	}
	h, err := ParseSparseHeader(buf)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	s := &SparseExtent{r: r, size: size, name: name, hdr: *h}
	if err := s.checkDescriptorArea(); err != nil {
		return nil, err
	}
	return s.EmbeddedDescriptor()
}

// WriteEmbeddedDescriptor replaces the descriptor embedded in a sparse
// extent whose header is h, padding the area with NULs. It fails if the new
// text does not fit in the space the header reserves.
func WriteEmbeddedDescriptor(w io.WriterAt, h *SparseHeader, d *Descriptor) error {
	if h.DescriptorOffset == 0 || h.DescriptorSize == 0 || h.DescriptorSize > MaxDescriptorSize/SectorSize {
		return errors.New("embedded descriptor: extent has no descriptor area")
	}
	area := make([]byte, h.DescriptorSize*SectorSize)
	text := d.Bytes()
	if len(text) >= len(area) {
		return fmt.Errorf("embedded descriptor: %d bytes do not fit in %d", len(text), len(area))
	}
	copy(area, text)
	_, err := w.WriteAt(area, int64(h.DescriptorOffset)*SectorSize)
	return err
}

// gt returns grain table i (nil when the directory entry is empty).
func (s *SparseExtent) gt(i uint32) ([]uint32, error) {
	if s.gd[i] == 0 {
		return nil, nil
	}
	s.mu.Lock()
	t, ok := s.gts[i]
	s.mu.Unlock()
	if ok {
		return t, nil
	}
	t, err := s.readGT(i)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	// Directory entries of a hostile file may all point at different
	// overlapping tables; bound the cache instead of trusting the file.
	if len(s.gts) >= maxCachedGTs {
		clear(s.gts)
	}
	s.gts[i] = t
	s.mu.Unlock()
	return t, nil
}

func (s *SparseExtent) readGT(i uint32) ([]uint32, error) {
	off := s.gd[i]
	b := make([]byte, int(s.hdr.NumGTEsPerGT)*4)
	if _, err := s.r.ReadAt(b, int64(off)*SectorSize); err != nil {
		return nil, fmt.Errorf("%s: grain table %d at sector %d: %w", s.name, i, off, err)
	}
	t := make([]uint32, s.hdr.NumGTEsPerGT)
	for k := range t {
		t[k] = binary.LittleEndian.Uint32(b[4*k:])
	}
	return t, nil
}

// GrainDirectory returns a copy of the grain directory: the sector of
// each grain table, 0 for none.
func (s *SparseExtent) GrainDirectory() []uint32 { return append([]uint32(nil), s.gd...) }

// GrainTable returns a copy of grain table i: the sector of each grain, 0
// for unallocated, 1 for zeroed when the header has FlagZeroedGrainGTE.
// For stream-optimized extents the sector is that of the grain's marker.
func (s *SparseExtent) GrainTable(i int) ([]uint32, error) {
	if i < 0 || i >= len(s.gd) {
		return nil, fmt.Errorf("%s: no grain table %d", s.name, i)
	}
	t, err := s.gt(uint32(i))
	return append([]uint32(nil), t...), err
}

// grainState is what a grain table says about one grain.
type grainState int

const (
	grainHole      grainState = iota // unallocated: zeros, or the parent's data
	grainZeroed                      // explicitly zeroed (GTE 1)
	grainAllocated                   // data at the returned sector
)

func (s *SparseExtent) lookup(grain uint64) (grainState, uint64, error) {
	per := uint64(s.hdr.NumGTEsPerGT)
	gdi := grain / per
	if gdi >= uint64(len(s.gd)) {
		return grainHole, 0, nil
	}
	t, err := s.gt(uint32(gdi))
	if err != nil || t == nil {
		return grainHole, 0, err
	}
	gte := t[grain%per]
	switch {
	case gte == 0:
		return grainHole, 0, nil
	case gte == gteZeroed && s.hdr.Flags&FlagZeroedGrainGTE != 0:
		return grainZeroed, 0, nil
	}
	return grainAllocated, uint64(gte), nil
}

// ReadAt reads virtual bytes of the extent; unallocated grains read as
// zeros. Reads past the capacity return io.EOF.
func (s *SparseExtent) ReadAt(p []byte, off int64) (int, error) {
	return s.readAt(p, off, nil)
}

// holeFunc fills p with the data of an unallocated range at virtual offset
// off; nil means zeros. It lets a delta disk fall through to its parent.
type holeFunc func(p []byte, off int64) error

func (s *SparseExtent) readAt(p []byte, off int64, hole holeFunc) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: negative offset %d", s.name, off)
	}
	size := s.Size()
	if off >= size {
		return 0, io.EOF
	}
	want := len(p)
	if int64(want) > size-off {
		p = p[:size-off]
	}
	gb := s.GrainBytes()
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		grain := uint64(pos / gb)
		within := pos % gb
		n := min(int64(len(p)-done), gb-within)
		dst := p[done : done+int(n)]
		st, sector, err := s.lookup(grain)
		if err != nil {
			return done, err
		}
		switch st {
		case grainHole:
			if hole != nil {
				if err := hole(dst, pos); err != nil {
					return done, err
				}
			} else {
				clear(dst)
			}
		case grainZeroed:
			clear(dst)
		case grainAllocated:
			if err := s.readGrain(dst, grain, sector, within); err != nil {
				return done, err
			}
		}
		done += int(n)
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

func (s *SparseExtent) readGrain(dst []byte, grain, sector uint64, within int64) error {
	if s.hdr.Flags&FlagCompressed != 0 {
		g, err := s.compressedGrain(grain, sector)
		if err != nil {
			return err
		}
		copy(dst, g[within:])
		return nil
	}
	if !s.fits(sector, 1) {
		return fmt.Errorf("%s: grain %d at sector %d beyond file size %d", s.name, grain, sector, s.size)
	}
	start := int64(sector)*SectorSize + within
	// A last grain may be cut short by the end of the file (qemu does not
	// always pad it); what is missing reads as zeros.
	avail := min(int64(len(dst)), max(s.size-start, 0))
	if avail > 0 {
		if _, err := s.r.ReadAt(dst[:avail], start); err != nil {
			return fmt.Errorf("%s: grain %d at sector %d: %w", s.name, grain, sector, err)
		}
	}
	clear(dst[avail:])
	return nil
}

// compressedGrain returns the whole decompressed grain whose marker is at
// sector. The result must not be modified.
func (s *SparseExtent) compressedGrain(grain, sector uint64) ([]byte, error) {
	lba := grain * s.hdr.GrainSize
	s.mu.Lock()
	if s.cache != nil && s.cacheLBA == lba {
		g := s.cache
		s.mu.Unlock()
		return g, nil
	}
	s.mu.Unlock()

	gb := s.GrainBytes()
	if !s.fits(sector, markerHeaderSize) {
		return nil, fmt.Errorf("%s: grain %d: marker at sector %d beyond file size %d", s.name, grain, sector, s.size)
	}
	var mh [markerHeaderSize]byte
	if _, err := s.r.ReadAt(mh[:], int64(sector)*SectorSize); err != nil {
		return nil, fmt.Errorf("%s: grain %d marker: %w", s.name, grain, err)
	}
	mlba := binary.LittleEndian.Uint64(mh[:])
	clen := int64(binary.LittleEndian.Uint32(mh[8:]))
	if mlba != lba {
		return nil, fmt.Errorf("%s: grain %d: marker at sector %d has LBA %d, want %d", s.name, grain, sector, mlba, lba)
	}
	if clen == 0 || clen > maxCompressedGrain(gb) {
		return nil, fmt.Errorf("%s: grain %d: compressed size %d invalid", s.name, grain, clen)
	}
	if !s.fits(sector, markerHeaderSize+clen) {
		return nil, fmt.Errorf("%s: grain %d: compressed data (%d bytes at sector %d) beyond file size %d", s.name, grain, clen, sector, s.size)
	}
	cdata := make([]byte, clen)
	if _, err := s.r.ReadAt(cdata, int64(sector)*SectorSize+markerHeaderSize); err != nil {
		return nil, fmt.Errorf("%s: grain %d data: %w", s.name, grain, err)
	}
	g, err := inflateGrain(cdata, gb)
	if err != nil {
		return nil, fmt.Errorf("%s: grain %d at sector %d: %w", s.name, grain, sector, err)
	}
	s.mu.Lock()
	s.cache, s.cacheLBA = g, lba
	s.mu.Unlock()
	return g, nil
}

// maxCompressedGrain bounds a compressed grain: deflate never expands data
// by more than a few bytes per 16 KiB block.
func maxCompressedGrain(grainBytes int64) int64 { return grainBytes + grainBytes/8 + 1024 }

// inflateGrain decompresses one grain into a buffer of exactly grainBytes.
// qemu and VMware write zlib streams (RFC 1950); the format documents raw
// deflate (RFC 1951), so both are accepted. A short result (the last grain
// of a disk whose size is not a grain multiple) is padded with zeros.
func inflateGrain(c []byte, grainBytes int64) ([]byte, error) {
	var zr io.ReadCloser
	if len(c) >= 2 && c[0]&0x0f == 8 && (uint16(c[0])<<8|uint16(c[1]))%31 == 0 {
		r, err := zlib.NewReader(bytes.NewReader(c))
		if err != nil {
			return nil, fmt.Errorf("zlib: %w", err)
		}
		zr = r
	} else {
		zr = flate.NewReader(bytes.NewReader(c))
	}
	defer zr.Close()
	out, err := io.ReadAll(io.LimitReader(zr, grainBytes+1))
	if err != nil {
		return nil, fmt.Errorf("inflate: %w", err)
	}
	if int64(len(out)) > grainBytes {
		return nil, fmt.Errorf("inflate: grain larger than %d bytes", grainBytes)
	}
	if int64(len(out)) < grainBytes {
		out = append(out, make([]byte, grainBytes-int64(len(out)))...)
	}
	return out, nil
}

// maxTableReads bounds the reads of one GrainCounts walk: 2^18 reads of
// up to 1 MiB of adjacent tables, or of one table each when they are
// scattered (stream-optimized files of up to 8 TiB; a hostile directory
// of overlapping tables).
const maxTableReads = 1 << 18

// GrainCounts walks every grain table and counts allocated and zeroed
// grains. It reads runs of adjacent tables (the layout qemu and VMware
// write) in one call, reuses one buffer, and counts a table that the
// previous directory entry also named only once. More than maxTableReads
// reads is an error, so its cost is bounded whatever the directory says.
func (s *SparseExtent) GrainCounts() (allocated, zeroed int64, err error) {
	gtBytes := int(s.hdr.NumGTEsPerGT) * 4
	step := uint32(0) // sectors per table, when tables can be adjacent
	if gtBytes%SectorSize == 0 {
		step = uint32(gtBytes / SectorSize)
	}
	buf := make([]byte, max(1, (1<<20)/gtBytes)*gtBytes)
	maxRun := len(buf) / gtBytes
	zeroedGTE := s.hdr.Flags&FlagZeroedGrainGTE != 0
	var last uint32
	var lastA, lastZ int64
	reads := 0
	for i := 0; i < len(s.gd); {
		off := s.gd[i]
		switch {
		case off == 0:
			i++
			continue
		case off == last:
			allocated, zeroed, i = allocated+lastA, zeroed+lastZ, i+1
			continue
		}
		n := 1
		for step != 0 && n < maxRun && i+n < len(s.gd) && uint64(s.gd[i+n]) == uint64(off)+uint64(n)*uint64(step) {
			n++
		}
		if reads++; reads > maxTableReads {
			return 0, 0, fmt.Errorf("%s: grain tables scattered over more than %d places; allocation not counted", s.name, maxTableReads)
		}
		b := buf[:n*gtBytes]
		if _, err := s.r.ReadAt(b, int64(off)*SectorSize); err != nil {
			return 0, 0, fmt.Errorf("%s: grain table %d at sector %d: %w", s.name, i, off, err)
		}
		for k := range n {
			var a, z int64
			for t := b[k*gtBytes : (k+1)*gtBytes]; len(t) >= 4; t = t[4:] {
				switch gte := binary.LittleEndian.Uint32(t); {
				case gte == 0:
				case gte == gteZeroed && zeroedGTE:
					z++
				default:
					a++
				}
			}
			allocated, zeroed = allocated+a, zeroed+z
			last, lastA, lastZ = s.gd[i+k], a, z
		}
		i += n
	}
	return allocated, zeroed, nil
}

package vmdk

import (
	"encoding/binary"
	"fmt"
	"io"
)

// MarkerType is the type of a stream-optimized metadata marker.
type MarkerType uint32

// Marker types (VMware Virtual Disk Format 5.0, "Stream-Optimized
// Compressed Sparse Extents"). MarkerGrain is not on disk: a marker whose
// size field is non-zero is a grain marker.
const (
	MarkerEOS    MarkerType = 0
	MarkerGT     MarkerType = 1
	MarkerGD     MarkerType = 2
	MarkerFooter MarkerType = 3
	MarkerGrain  MarkerType = 0xffffffff
)

func (t MarkerType) String() string {
	switch t {
	case MarkerEOS:
		return "EOS"
	case MarkerGT:
		return "GT"
	case MarkerGD:
		return "GD"
	case MarkerFooter:
		return "footer"
	case MarkerGrain:
		return "grain"
	}
	return fmt.Sprintf("marker(%d)", uint32(t))
}

// markerHeaderSize is the lba/numSectors (8) + size (4) prefix shared by
// all markers; a grain's compressed bytes follow it directly.
const markerHeaderSize = 12

// Marker is one marker found in a stream-optimized extent.
type Marker struct {
	Offset     int64      // byte offset of the marker in the file
	Type       MarkerType // MarkerGrain for grain markers
	LBA        uint64     // grain: first virtual sector of the grain
	DataSize   uint32     // grain: bytes of compressed data after the 12-byte prefix
	NumSectors uint64     // metadata: sectors of metadata after the marker sector
}

// ScanMarkers walks the markers of a stream-optimized extent from byte
// offset start (normally the header's overHead) and calls fn for each,
// stopping after the end-of-stream marker or at the end of the file. Every
// marker and the data it announces must lie inside the file. Each step
// advances at least one sector, so the walk always terminates.
func ScanMarkers(r io.ReaderAt, size, start int64, fn func(Marker) error) error {
	if start < 0 || start%SectorSize != 0 {
		return fmt.Errorf("stream: start offset %d not sector aligned", start)
	}
	var b [16]byte
	le := binary.LittleEndian
	for off := start; off < size; {
		if size-off < SectorSize {
			return fmt.Errorf("stream: marker at offset %d: truncated sector (file size %d)", off, size)
		}
		if _, err := r.ReadAt(b[:], off); err != nil {
			return fmt.Errorf("stream: marker at offset %d: %w", off, err)
		}
		m := Marker{Offset: off}
		val, n := le.Uint64(b[:]), le.Uint32(b[8:])
		var next int64
		if n != 0 {
			m.Type, m.LBA, m.DataSize = MarkerGrain, val, n
			end := off + markerHeaderSize + int64(n)
			if end > size {
				return fmt.Errorf("stream: grain marker at offset %d: %d bytes of data beyond file size %d", off, n, size)
			}
			next = (end + SectorSize - 1) / SectorSize * SectorSize
		} else {
			m.Type, m.NumSectors = MarkerType(le.Uint32(b[12:])), val
			switch m.Type {
			case MarkerEOS:
				return fn(m)
			case MarkerGT, MarkerGD, MarkerFooter:
			default:
				return fmt.Errorf("stream: marker at offset %d: unknown type %d", off, uint32(m.Type))
			}
			if val > uint64(size-off-SectorSize)/SectorSize {
				return fmt.Errorf("stream: %s marker at offset %d: %d sectors beyond file size %d", m.Type, off, val, size)
			}
			next = off + SectorSize + int64(val)*SectorSize
		}
		if err := fn(m); err != nil {
			return err
		}
		off = next
	}
	return nil
}

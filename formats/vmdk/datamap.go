package vmdk

import (
	"fmt"
	"sort"
)

// DataMapper is optionally implemented by a File that knows where its
// data lies (SEEK_DATA/SEEK_HOLE on its backing file).
type DataMapper interface {
	// NextData returns the first data range [start, end) at or after
	// off; start >= Size() when there is none. Bytes outside data ranges
	// read as zeros.
	NextData(off int64) (start, end int64, err error)
}

// Run is a stretch of a Disk's virtual bytes: Zero runs are known to
// read as zeros without stored data (unallocated or zeroed grains, ZERO
// extents, holes of flat extents); other runs hold data or may.
type Run struct {
	Length int64
	Zero   bool
}

// maxMapRuns bounds the runs Map returns per call.
const maxMapRuns = 1 << 14

// Map describes [off, off+n) as consecutive runs. It may cover less
// than n (a long, fragmented range), never less than one byte when n > 0.
// A delta disk's unallocated grains are reported as data: they read
// through to the parent.
func (d *Disk) Map(off, n int64) ([]Run, error) {
	if off < 0 || n < 0 || off > d.size || n > d.size-off {
		return nil, fmt.Errorf("%s: map [%d, +%d) outside the disk", d.path, off, n)
	}
	var out []Run
	add := func(l int64, zero bool) {
		if l <= 0 {
			return
		}
		if k := len(out); k > 0 && out[k-1].Zero == zero {
			out[k-1].Length += l
			return
		}
		out = append(out, Run{l, zero})
	}
	end := off + n
	i := sort.Search(len(d.exts), func(i int) bool { return d.exts[i].start+d.exts[i].length > off })
	for pos := off; pos < end && i < len(d.exts) && len(out) < maxMapRuns; i++ {
		e := d.exts[i]
		if e.length == 0 {
			continue
		}
		l := min(end, e.start+e.length) - pos
		within := pos - e.start
		var err error
		switch {
		case e.file == nil:
			add(l, true)
		case e.sparse != nil:
			err = d.mapSparse(e, within, l, add)
		default:
			err = mapFlat(e, within, l, add)
		}
		if err != nil {
			return nil, err
		}
		pos += l
	}
	return out, nil
}

func (d *Disk) mapSparse(e *extent, within, l int64, add func(int64, bool)) error {
	s := e.sparse
	gb := s.GrainBytes()
	for pos, end := within, within+l; pos < end; {
		n := min(end, (pos/gb+1)*gb) - pos
		if pos >= s.Size() {
			add(end-pos, d.parent == nil) // past the header's capacity
			return nil
		}
		st, _, err := s.lookup(uint64(pos / gb))
		if err != nil {
			return err
		}
		add(n, st == grainZeroed || (st == grainHole && d.parent == nil))
		pos += n
	}
	return nil
}

func mapFlat(e *extent, within, l int64, add func(int64, bool)) error {
	fileOff := e.Offset*SectorSize + within
	size := e.file.Size()
	inFile := max(min(l, size-fileOff), 0)
	dm, ok := e.file.(DataMapper)
	if !ok {
		add(inFile, false)
		add(l-inFile, true) // a short flat file reads as zeros past its end
		return nil
	}
	for pos, end := fileOff, fileOff+inFile; pos < end; {
		start, stop, err := dm.NextData(pos)
		if err != nil {
			return fmt.Errorf("%s: %w", e.path, err)
		}
		start, stop = max(start, pos), min(stop, end)
		if start < end && stop <= start {
			add(end-pos, false) // a mapper that makes no progress: data
			break
		}
		if start >= end {
			add(end-pos, true)
			break
		}
		add(start-pos, true)
		add(stop-start, false)
		pos = stop
	}
	add(l-inFile, true)
	return nil
}

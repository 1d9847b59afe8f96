package vmdk

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// maxDataSegments bounds the SEEK_DATA/SEEK_HOLE walk of AllocatedBytes.
const maxDataSegments = 1 << 18

// AllocatedBytes counts the bytes of [off, off+n) that are not holes,
// using SEEK_DATA/SEEK_HOLE. Seeking does not disturb ReadAt (pread). A
// file of more than maxDataSegments separate data ranges is an error,
// so the walk is bounded however the file is fragmented.
func (f *osFile) AllocatedBytes(off, n int64) (int64, error) {
	fd := int(f.Fd())
	end := off + n
	var total int64
	for pos, seg := off, 0; pos < end; seg++ {
		if seg >= maxDataSegments {
			return 0, fmt.Errorf("%s: more than %d separate data ranges; allocation not counted", f.Name(), maxDataSegments)
		}
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) || (err == nil && data >= end) {
			break // no more data in range
		}
		if err != nil {
			if errors.Is(err, unix.EINVAL) {
				return n, nil // file system without hole reporting
			}
			return 0, err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return 0, err
		}
		total += min(hole, end) - data
		pos = hole
	}
	return total, nil
}

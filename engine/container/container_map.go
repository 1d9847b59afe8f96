package container

import (
	"errors"
	"syscall"

	"golang.org/x/sys/unix"
)

// NextData returns the first range [start, end) of logical bytes at or
// after off that may hold data, by SEEK_DATA/SEEK_HOLE on the backing
// file; start >= Size() when the rest is holes. Ranges are rounded to
// whole data units (data down, holes up), so everything outside them
// reads as zeros. A file system without hole reporting has data
// everywhere.
func (c *Container) NextData(off int64) (start, end int64, err error) {
	size := c.Size()
	if off >= size {
		return size, size, nil
	}
	fd := int(c.f.Fd())
	b, err := unix.Seek(fd, c.payloadOff+off/c.unit*c.unit, unix.SEEK_DATA)
	switch {
	case errors.Is(err, syscall.ENXIO):
		return size, size, nil
	case errors.Is(err, syscall.EINVAL):
		return off, size, nil
	case err != nil:
		return 0, 0, err
	}
	start = max((b-c.payloadOff)/c.unit*c.unit, off)
	if start >= size {
		return size, size, nil
	}
	h, err := unix.Seek(fd, c.payloadOff+start, unix.SEEK_HOLE)
	if err != nil {
		return 0, 0, err
	}
	end = min((h-c.payloadOff+c.unit-1)/c.unit*c.unit, size)
	return start, max(end, start+1), nil
}

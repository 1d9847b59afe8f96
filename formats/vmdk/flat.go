package vmdk

import (
	"fmt"
	"strings"
)

// FlatGeometry is the BIOS geometry a flat descriptor records for a disk
// of sectors 512-byte sectors: 255 heads, 63 sectors per track, and as
// many cylinders as fit (at most 65535), as VMware writes it.
func FlatGeometry(sectors int64) (cylinders, heads, perTrack int64) {
	return min(sectors/(255*63), 65535), 255, 63
}

// NewFlatDescriptor returns the text descriptor of a monolithicFlat disk
// of size bytes (a multiple of 512) whose one extent is the file extent
// (a plain name in the same directory) and whose content id is cid. It
// parses back with ParseDescriptor (checked by the tests).
func NewFlatDescriptor(extent string, size int64, cid uint32) ([]byte, error) {
	if size <= 0 || size%512 != 0 {
		return nil, fmt.Errorf("flat descriptor: size %d is not a positive multiple of 512", size)
	}
	if extent == "" || strings.ContainsAny(extent, "\"/\n\x00") {
		return nil, fmt.Errorf("flat descriptor: extent name %q is not a plain file name", extent)
	}
	sectors := size / 512
	cyl, heads, perTrack := FlatGeometry(sectors)
	return fmt.Appendf(nil, `%s
version=1
CID=%08x
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW %d FLAT "%s" 0

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "19"
ddb.geometry.cylinders = "%d"
ddb.geometry.heads = "%d"
ddb.geometry.sectors = "%d"
ddb.adapterType = "lsilogic"
`, DescriptorMagic, cid, sectors, extent, cyl, heads, perTrack), nil
}

package nvram

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"
)

// GUID is an EFI GUID in its on-disk byte order: the first three fields
// little endian, the last eight bytes as written.
type GUID [16]byte

// EFIGlobalVariable is the namespace of the standard UEFI variables
// (Boot####, BootOrder, Lang, ...).
var EFIGlobalVariable = MustParseGUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")

// String formats the GUID as 8-4-4-4-12 lower-case hex.
func (g GUID) String() string {
	le := binary.LittleEndian
	return fmt.Sprintf("%08x-%04x-%04x-%x-%x", le.Uint32(g[0:]), le.Uint16(g[4:]), le.Uint16(g[6:]), g[8:10], g[10:16])
}

// MarshalText implements encoding.TextMarshaler (for JSON reports).
func (g GUID) MarshalText() ([]byte, error) { return []byte(g.String()), nil }

// ParseGUID parses the 8-4-4-4-12 form.
func ParseGUID(s string) (GUID, error) {
	var g GUID
	parts := strings.Split(s, "-")
	if len(parts) != 5 || len(parts[0]) != 8 || len(parts[1]) != 4 || len(parts[2]) != 4 || len(parts[3]) != 4 || len(parts[4]) != 12 {
		return g, fmt.Errorf("nvram: GUID %q: want 8-4-4-4-12 hex digits", s)
	}
	b, err := hex.DecodeString(strings.Join(parts, ""))
	if err != nil {
		return g, fmt.Errorf("nvram: GUID %q: %w", s, err)
	}
	le := binary.LittleEndian
	be := binary.BigEndian
	le.PutUint32(g[0:], be.Uint32(b[0:]))
	le.PutUint16(g[4:], be.Uint16(b[4:]))
	le.PutUint16(g[6:], be.Uint16(b[6:]))
	copy(g[8:], b[8:])
	return g, nil
}

// MustParseGUID is ParseGUID for constants.
func MustParseGUID(s string) GUID {
	g, err := ParseGUID(s)
	if err != nil {
		panic(err)
	}
	return g
}

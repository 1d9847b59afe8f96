// Package nvram reads and writes VMware .nvram files.
//
// Layout (little endian), as far as public reverse engineering shows:
//
//	"MRVN" u32 version (1)
//	entries until end of file:
//	    name[4] subname[4] u32 length, then length bytes of data
//
// BIOS-era files hold CMOS, ESCD and similar entries; they are kept as
// opaque data. The entry named "EFI_" with subname "NV\0\0" holds the UEFI
// variable store:
//
//	"VMWNVRAM" u32 reserved (0) u32 used (bytes from "VMWNVRAM" to the end
//	of the last record), then records, then 0xFF fill to the entry's end.
//	record: GUID[16] (EFI mixed endian) u32 attributes u32 size
//	        u32 nameSize name[nameSize] (UTF-16LE, NUL terminated)
//	        value[size-nameSize]
//
// The store behaves like an append log: a name may occur more than once and
// the last record wins. Parsing keeps every byte, so File.Bytes gives back
// the input exactly until something is changed.
package nvram

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"unicode/utf16"
)

// Magic starts every VMware nvram file.
const Magic = "MRVN"

// DefaultSize is the size of the nvram files VMware creates for new VMs,
// and the size New produces by default.
const DefaultSize = 8684

// Limits that bound what Parse allocates whatever the input. Real files
// are 8,684 bytes (BIOS and older EFI) to a few hundred KiB (EFI with
// Secure Boot databases), with a handful of entries and a few hundred
// variables.
const (
	MaxSize      = 4 << 20
	MaxEntries   = 1024
	MaxVariables = 1 << 14
)

const (
	fileHeaderSize  = 8
	entryHeaderSize = 12
	storeMagic      = "VMWNVRAM"
	storeHeaderSize = 16
	recordHeader    = 28
)

// EFI variable attributes.
const (
	AttrNonVolatile                       = 0x01
	AttrBootServiceAccess                 = 0x02
	AttrRuntimeAccess                     = 0x04
	AttrTimeBasedAuthenticatedWriteAccess = 0x20
)

// File is a parsed nvram file.
type File struct {
	Version uint32
	Entries []*Entry
	// Trailer holds bytes after the last entry that do not form a whole
	// entry. Real files have none; it is kept so output matches input.
	Trailer []byte
}

// Entry is one top-level nvram entry.
type Entry struct {
	Name    [4]byte
	Subname [4]byte
	// Data is the entry's payload as read. When Store is non-nil the
	// payload is produced from Store instead.
	Data []byte
	// Store is the parsed UEFI variable store of an EFI_/NV entry.
	Store *VarStore
	// StoreErr says why an EFI_/NV payload could not be parsed; the entry
	// is then kept as opaque data.
	StoreErr error
}

// VarStore is the "VMWNVRAM" UEFI variable store.
type VarStore struct {
	Reserved uint32
	Vars     []*Variable
	size     int    // payload length of the entry to keep
	tail     []byte // bytes after the records, as read
	dirty    bool
}

// Variable is one UEFI variable record.
type Variable struct {
	GUID       GUID
	Attributes uint32
	// RawName is the UTF-16LE name including its terminator, as stored.
	RawName []byte
	Value   []byte
}

// Parse parses an nvram image. A missing magic, an input larger than
// MaxSize or more than MaxEntries entries is an error; entries that cannot
// be understood are kept opaque (a variable store of more than
// MaxVariables records too, with StoreErr saying so).
func Parse(b []byte) (*File, error) {
	if len(b) < fileHeaderSize || string(b[:4]) != Magic {
		return nil, errors.New("nvram: missing MRVN magic")
	}
	if len(b) > MaxSize {
		return nil, fmt.Errorf("nvram: %d bytes exceeds limit of %d", len(b), MaxSize)
	}
	f := &File{Version: binary.LittleEndian.Uint32(b[4:])}
	rest := b[fileHeaderSize:]
	for len(rest) >= entryHeaderSize {
		if len(f.Entries) == MaxEntries {
			return nil, fmt.Errorf("nvram: more than %d entries", MaxEntries)
		}
		n := binary.LittleEndian.Uint32(rest[8:])
		if uint64(n) > uint64(len(rest)-entryHeaderSize) {
			break
		}
		e := &Entry{Data: clone(rest[entryHeaderSize : entryHeaderSize+int(n)])}
		copy(e.Name[:], rest[0:4])
		copy(e.Subname[:], rest[4:8])
		if e.IsEFIStore() {
			e.Store, e.StoreErr = parseStore(e.Data)
		}
		f.Entries = append(f.Entries, e)
		rest = rest[entryHeaderSize+int(n):]
	}
	if len(rest) > 0 {
		f.Trailer = clone(rest)
	}
	return f, nil
}

func clone(b []byte) []byte { return append([]byte(nil), b...) }

// IsEFIStore reports whether the entry is the EFI_/NV variable store.
func (e *Entry) IsEFIStore() bool {
	return string(e.Name[:]) == "EFI_" && strings.TrimRight(string(e.Subname[:]), "\x00") == "NV"
}

// Label returns "name/subname" with NULs trimmed, for display.
func (e *Entry) Label() string {
	return strings.TrimRight(string(e.Name[:]), "\x00") + "/" + strings.TrimRight(string(e.Subname[:]), "\x00")
}

// Payload returns the entry's data as it will be written.
func (e *Entry) Payload() []byte {
	if e.Store != nil {
		return e.Store.bytes()
	}
	return e.Data
}

func parseStore(b []byte) (*VarStore, error) {
	if len(b) < storeHeaderSize || string(b[:8]) != storeMagic {
		return nil, errors.New("nvram: EFI_/NV: missing VMWNVRAM magic")
	}
	s := &VarStore{Reserved: binary.LittleEndian.Uint32(b[8:]), size: len(b)}
	used := binary.LittleEndian.Uint32(b[12:])
	if used < storeHeaderSize || uint64(used) > uint64(len(b)) {
		return nil, fmt.Errorf("nvram: EFI_/NV: used size %d outside store of %d bytes", used, len(b))
	}
	pos := storeHeaderSize
	for end := int(used); pos < end; {
		if len(s.Vars) == MaxVariables {
			return nil, fmt.Errorf("nvram: EFI_/NV: more than %d variable records", MaxVariables)
		}
		if end-pos < recordHeader {
			return nil, fmt.Errorf("nvram: EFI_/NV: record at %d: %d bytes left, header needs %d", pos, end-pos, recordHeader)
		}
		r := b[pos:end]
		v := &Variable{Attributes: binary.LittleEndian.Uint32(r[16:])}
		copy(v.GUID[:], r[:16])
		size := binary.LittleEndian.Uint32(r[20:])
		nameSize := binary.LittleEndian.Uint32(r[24:])
		if nameSize > size || uint64(size) > uint64(len(r)-recordHeader) {
			return nil, fmt.Errorf("nvram: EFI_/NV: record at %d: size %d / name size %d exceed the store", pos, size, nameSize)
		}
		v.RawName = clone(r[recordHeader : recordHeader+nameSize])
		v.Value = clone(r[recordHeader+nameSize : recordHeader+size])
		s.Vars = append(s.Vars, v)
		pos += recordHeader + int(size)
	}
	s.tail = clone(b[pos:])
	return s, nil
}

// bytes serialises the store. Unchanged stores reproduce their input; a
// changed store keeps the entry's length (0xFF fill) when the records fit,
// and grows otherwise.
func (s *VarStore) bytes() []byte {
	var b bytes.Buffer
	b.WriteString(storeMagic)
	binary.Write(&b, binary.LittleEndian, s.Reserved)
	b.Write([]byte{0, 0, 0, 0}) // used, patched below
	for _, v := range s.Vars {
		b.Write(v.record())
	}
	out := b.Bytes()
	binary.LittleEndian.PutUint32(out[12:], uint32(len(out)))
	if !s.dirty {
		return append(out, s.tail...)
	}
	if len(out) < s.size {
		out = append(out, bytes.Repeat([]byte{0xff}, s.size-len(out))...)
	}
	return out
}

func (v *Variable) record() []byte {
	b := make([]byte, recordHeader, recordHeader+len(v.RawName)+len(v.Value))
	copy(b, v.GUID[:])
	binary.LittleEndian.PutUint32(b[16:], v.Attributes)
	binary.LittleEndian.PutUint32(b[20:], uint32(len(v.RawName)+len(v.Value)))
	binary.LittleEndian.PutUint32(b[24:], uint32(len(v.RawName)))
	b = append(b, v.RawName...)
	return append(b, v.Value...)
}

// Name decodes the UTF-16LE name up to its terminator.
func (v *Variable) Name() string {
	u := make([]uint16, 0, len(v.RawName)/2)
	for i := 0; i+1 < len(v.RawName); i += 2 {
		c := binary.LittleEndian.Uint16(v.RawName[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

// NewVariable builds a variable record with a NUL-terminated UTF-16LE name.
func NewVariable(guid GUID, name string, attributes uint32, value []byte) *Variable {
	u := utf16.Encode([]rune(name))
	raw := make([]byte, 2*len(u)+2)
	for i, c := range u {
		binary.LittleEndian.PutUint16(raw[2*i:], c)
	}
	return &Variable{GUID: guid, Attributes: attributes, RawName: raw, Value: clone(value)}
}

// Used returns the number of store bytes the records occupy, header
// included (the "used" field as it will be written).
func (s *VarStore) Used() int {
	n := storeHeaderSize
	for _, v := range s.Vars {
		n += recordHeader + len(v.RawName) + len(v.Value)
	}
	return n
}

// Get returns the effective (last) record for guid and name, or nil.
func (s *VarStore) Get(guid GUID, name string) *Variable {
	for i := len(s.Vars) - 1; i >= 0; i-- {
		if v := s.Vars[i]; v.GUID == guid && v.Name() == name {
			return v
		}
	}
	return nil
}

// Set replaces the value of the effective record, or appends a record.
func (s *VarStore) Set(guid GUID, name string, attributes uint32, value []byte) {
	s.dirty = true
	if v := s.Get(guid, name); v != nil {
		v.Attributes, v.Value = attributes, clone(value)
		return
	}
	s.Vars = append(s.Vars, NewVariable(guid, name, attributes, value))
}

// Delete removes every record for guid and name and returns how many.
func (s *VarStore) Delete(guid GUID, name string) int {
	n := 0
	kept := s.Vars[:0]
	for _, v := range s.Vars {
		if v.GUID == guid && v.Name() == name {
			n++
			continue
		}
		kept = append(kept, v)
	}
	s.Vars = kept
	if n > 0 {
		s.dirty = true
	}
	return n
}

// EFIStore returns the UEFI variable store, or nil for BIOS-era files.
func (f *File) EFIStore() *VarStore {
	for _, e := range f.Entries {
		if e.Store != nil {
			return e.Store
		}
	}
	return nil
}

// Bytes serialises the file.
func (f *File) Bytes() []byte {
	var b bytes.Buffer
	b.WriteString(Magic)
	binary.Write(&b, binary.LittleEndian, f.Version)
	for _, e := range f.Entries {
		p := e.Payload()
		b.Write(e.Name[:])
		b.Write(e.Subname[:])
		binary.Write(&b, binary.LittleEndian, uint32(len(p)))
		b.Write(p)
	}
	b.Write(f.Trailer)
	return b.Bytes()
}

// New builds a fresh UEFI nvram image of exactly size bytes (DefaultSize
// when size is 0): "MRVN", version 1, and a single EFI_/NV entry whose
// VMWNVRAM store holds vars (DefaultVariables when nil), filled with 0xFF to
// the end. A real firmware adds its own entries on first boot; this is
// what a VM that was never powered on plausibly carries.
func New(size int, vars []*Variable) ([]byte, error) {
	if size == 0 {
		size = DefaultSize
	}
	if vars == nil {
		vars = DefaultVariables()
	}
	s := &VarStore{Vars: vars, dirty: true}
	payload := size - fileHeaderSize - entryHeaderSize
	if payload < s.Used() {
		return nil, fmt.Errorf("nvram: %d bytes too small for %d bytes of variables", size, s.Used())
	}
	s.size = payload
	f := &File{Version: 1, Entries: []*Entry{{Name: [4]byte{'E', 'F', 'I', '_'}, Subname: [4]byte{'N', 'V'}, Store: s}}}
	return f.Bytes(), nil
}

// DefaultVariables returns the variables New uses: Lang "eng",
// PlatformLang "en-US" and Timeout 0, in the EFI global namespace with
// NV+BS+RT access.
func DefaultVariables() []*Variable {
	const a = AttrNonVolatile | AttrBootServiceAccess | AttrRuntimeAccess
	return []*Variable{
		NewVariable(EFIGlobalVariable, "Lang", a, []byte("eng\x00")),
		NewVariable(EFIGlobalVariable, "PlatformLang", a, []byte("en-US\x00")),
		NewVariable(EFIGlobalVariable, "Timeout", a, []byte{0, 0}),
	}
}

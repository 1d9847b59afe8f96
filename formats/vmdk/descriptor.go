package vmdk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/crypto"

	"github.com/vmcryptd/vmcryptd/formats/keylocator"
)

// MaxDescriptorSize bounds how much descriptor text is read. Real
// descriptors are a few hundred bytes; a twoGbMaxExtent descriptor of a
// 62 TB disk is about 2 MB.
const MaxDescriptorSize = 4 << 20

// Limits on the content of a descriptor, so that parsing costs a bounded
// amount of memory whatever the input: a twoGbMaxExtent descriptor of a
// 62 TB disk has 31,744 extent lines and about 30 others.
const (
	MaxDescriptorLines   = 1 << 16
	MaxDescriptorExtents = 1 << 15
)

// DescriptorMagic starts every text descriptor VMware and qemu write.
const DescriptorMagic = "# Disk DescriptorFile"

// IsDescriptorText reports whether head, the first bytes of a file (or the
// whole file), is a text descriptor as VMware and qemu write it:
// DescriptorMagic at offset 0, then text without NUL bytes, optionally
// followed by a qemu tail (descriptorTail): NUL padding (QEMU pads the
// descriptor it rewrites, and the one qemu-img convert writes, to 512
// bytes, or to 4 KiB through a cache=none view), possibly with the remains
// of a longer text that an in-place rewrite left after the new text's NUL.
// Readers, qemu's and ParseDescriptor, stop at the first NUL. A control
// byte after it is binary data, not a descriptor.
func IsDescriptorText(head []byte) bool {
	if !bytes.HasPrefix(head, []byte(DescriptorMagic)) {
		return false
	}
	i := bytes.IndexByte(head, 0)
	return i < 0 || descriptorTail(head[i:])
}

// descriptorTail reports whether b, what follows a descriptor text from its
// first NUL on, is what qemu leaves there: NULs, and the tail of a longer
// earlier text. qemu rewrites a descriptor in place when a disk's CID
// changes (block/vmdk.c vmdk_write_cid: it reads the whole buffer, prints
// the new CID and appends the rest, and writes the buffer back); a CID
// with fewer hex digits ends the text earlier and leaves the old text's
// last bytes after the NUL. Only NUL, tab, CR, LF and bytes from 0x20 up
// count: a control byte is binary data.
func descriptorTail(b []byte) bool {
	for _, c := range b {
		if c < 0x20 && c != 0 && c != '\t' && c != '\n' && c != '\r' {
			return false
		}
	}
	return true
}

// lineKind classifies one line of a descriptor.
type lineKind int

const (
	lineBlank   lineKind = iota // empty or only white space
	lineComment                 // starts with '#'
	lineHeader                  // key=value that is not ddb.*
	lineExtent                  // RW/RDONLY/NOACCESS extent line
	lineDDB                     // ddb.key = "value"
	lineUnknown                 // anything else, kept verbatim
)

// Extent is one extent line of a descriptor:
//
//	ACCESS SECTORS TYPE ["FILENAME" [OFFSET]]
type Extent struct {
	Access    string // RW, RDONLY or NOACCESS
	Sectors   int64  // size of the extent in 512-byte sectors
	Type      string // FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, ...
	Filename  string // empty for ZERO extents
	Offset    int64  // start of the extent inside Filename, in sectors (FLAT)
	HasOffset bool   // whether the line carried an offset column
}

// Extent types and access modes written by VMware and qemu.
const (
	ExtentFlat       = "FLAT"
	ExtentSparse     = "SPARSE"
	ExtentZero       = "ZERO"
	ExtentVMFS       = "VMFS"
	ExtentVMFSSparse = "VMFSSPARSE"

	AccessRW       = "RW"
	AccessRDONLY   = "RDONLY"
	AccessNOACCESS = "NOACCESS"
)

// line is one descriptor line. For key/value lines the value sits at
// text[valStart:valEnd] so that a setter can replace exactly the value and
// keep the author's spacing and quoting.
type line struct {
	kind     lineKind
	text     string // without line terminator
	eol      string // "\n", "\r\n" or "" (last line without terminator)
	key      string
	valStart int
	valEnd   int
	extent   Extent
}

// Descriptor is a parsed VMDK descriptor. Every byte of the input is kept:
// Bytes returns the original text until a setter changes a line, and then
// only that line differs.
type Descriptor struct {
	lines []line
	tail  []byte // from the text's first NUL on (qemu's padding and leftovers), kept after the text
}

// ParseDescriptor parses descriptor text. Comments, blank and unknown lines
// are kept in order. A malformed extent line is an error because reading
// the disk would otherwise silently use the wrong layout. Like qemu, it
// reads the text up to the first NUL; what follows (NUL padding, and the
// remains qemu's in-place rewrites leave, see descriptorTail) is kept
// apart, byte for byte, and Bytes gives it back after the text. A tail
// with other bytes is an error. More than MaxDescriptorLines lines or
// MaxDescriptorExtents extents is an error.
func ParseDescriptor(b []byte) (*Descriptor, error) {
	if len(b) > MaxDescriptorSize {
		return nil, fmt.Errorf("descriptor: %d bytes exceeds limit of %d", len(b), MaxDescriptorSize)
	}
	text, tail := b, []byte(nil)
	if i := bytes.IndexByte(b, 0); i >= 0 {
		text, tail = b[:i], b[i:]
		if !descriptorTail(tail) {
			return nil, fmt.Errorf("descriptor: binary data after the NUL at offset %d (only NUL padding and text may follow the text)", i)
		}
	}
	lines := bytes.Count(text, []byte("\n"))
	if len(text) > 0 && text[len(text)-1] != '\n' {
		lines++ // a last line without terminator
	}
	if lines > MaxDescriptorLines {
		return nil, fmt.Errorf("descriptor: more than %d lines", MaxDescriptorLines)
	}
	d := &Descriptor{tail: append([]byte(nil), tail...), lines: make([]line, 0, lines)}
	s := string(text)
	extents := 0
	for n := 1; len(s) > 0; n++ {
		var text, eol string
		if i := strings.IndexByte(s, '\n'); i >= 0 {
			text, s = s[:i], s[i+1:]
			eol = "\n"
			if strings.HasSuffix(text, "\r") {
				text = text[:len(text)-1]
				eol = "\r\n"
			}
		} else {
			text, s = s, ""
		}
		l, err := parseLine(text)
		if err != nil {
			return nil, fmt.Errorf("descriptor: line %d: %w", n, err)
		}
		l.eol = eol
		if l.kind == lineExtent {
			if extents++; extents > MaxDescriptorExtents {
				return nil, fmt.Errorf("descriptor: more than %d extents", MaxDescriptorExtents)
			}
		}
		d.lines = append(d.lines, l)
	}
	return d, nil
}

func parseLine(text string) (line, error) {
	l := line{text: text}
	t := strings.TrimSpace(text)
	switch {
	case t == "":
		l.kind = lineBlank
		return l, nil
	case t[0] == '#':
		l.kind = lineComment
		return l, nil
	}
	if first := strings.Fields(t)[0]; first == AccessRW || first == AccessRDONLY || first == AccessNOACCESS {
		e, err := parseExtent(t)
		if err != nil {
			return l, err
		}
		l.kind, l.extent = lineExtent, e
		return l, nil
	}
	eq := strings.IndexByte(text, '=')
	if eq <= 0 || strings.TrimSpace(text[:eq]) == "" || strings.ContainsAny(strings.TrimSpace(text[:eq]), " \t\"") {
		l.kind = lineUnknown
		return l, nil
	}
	l.key = strings.TrimSpace(text[:eq])
	l.kind = lineHeader
	if isDDBKey(l.key) {
		l.kind = lineDDB
	}
	i := eq + 1
	for i < len(text) && (text[i] == ' ' || text[i] == '\t') {
		i++
	}
	if i < len(text) && text[i] == '"' {
		j := strings.IndexByte(text[i+1:], '"')
		if j < 0 {
			return l, fmt.Errorf("%s: unterminated quoted value", l.key)
		}
		l.valStart, l.valEnd = i+1, i+1+j
	} else {
		l.valStart = i
		l.valEnd = i + len(strings.TrimRight(text[i:], " \t"))
	}
	return l, nil
}

func isDDBKey(k string) bool {
	return len(k) > 4 && strings.EqualFold(k[:4], "ddb.")
}

// parseExtent parses the trimmed text of an extent line.
func parseExtent(t string) (Extent, error) {
	var e Extent
	fields := strings.Fields(t)
	if len(fields) < 3 {
		return e, fmt.Errorf("extent %q: want ACCESS SECTORS TYPE", t)
	}
	e.Access = fields[0]
	n, err := strconv.ParseInt(fields[1], 10, 64)
	if err != nil || n < 0 || n > maxSectors {
		return e, fmt.Errorf("extent %q: bad sector count %q", t, fields[1])
	}
	e.Sectors = n
	e.Type = fields[2]
	// Re-find the rest after the type token; the file name is quoted and
	// may contain spaces, so it cannot be taken from fields.
	rest := t
	for k := 0; k < 3; k++ {
		rest = strings.TrimLeft(rest, " \t")
		i := strings.IndexAny(rest, " \t")
		if i < 0 {
			rest = ""
			break
		}
		rest = rest[i:]
	}
	rest = strings.TrimSpace(rest)
	if rest == "" {
		return e, nil
	}
	if rest[0] != '"' {
		return e, fmt.Errorf("extent %q: file name must be quoted", t)
	}
	j := strings.IndexByte(rest[1:], '"')
	if j < 0 {
		return e, fmt.Errorf("extent %q: unterminated file name", t)
	}
	e.Filename = rest[1 : 1+j]
	rest = strings.TrimSpace(rest[2+j:])
	if rest == "" {
		return e, nil
	}
	off, _, _ := strings.Cut(rest, " ")
	o, err := strconv.ParseInt(off, 10, 64)
	if err != nil || o < 0 || o > maxSectors {
		return e, fmt.Errorf("extent %q: bad offset %q", t, off)
	}
	e.Offset, e.HasOffset = o, true
	return e, nil
}

// maxSectors keeps every sector count convertible to a byte count.
const maxSectors = (1<<63 - 1) / SectorSize

// String formats the extent as a descriptor line (without terminator).
func (e Extent) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %d %s", e.Access, e.Sectors, e.Type)
	if e.Filename != "" || e.HasOffset {
		fmt.Fprintf(&b, " %q", e.Filename)
	}
	if e.HasOffset {
		fmt.Fprintf(&b, " %d", e.Offset)
	}
	return b.String()
}

// Bytes returns the descriptor text.
func (d *Descriptor) Bytes() []byte {
	var b bytes.Buffer
	d.WriteTo(&b)
	return b.Bytes()
}

// String returns the descriptor text.
func (d *Descriptor) String() string { return string(d.Bytes()) }

// WriteTo writes the descriptor text to w, then the tail (NUL padding,
// qemu's leftovers) it was read with, if any: a reader stops at its first
// NUL, so the tail never changes what the descriptor says.
func (d *Descriptor) WriteTo(w io.Writer) (int64, error) {
	var n int64
	for _, l := range d.lines {
		k, err := io.WriteString(w, l.text+l.eol)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
	if len(d.tail) > 0 {
		k, err := w.Write(d.tail)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// Extents returns the extent lines in order.
func (d *Descriptor) Extents() []Extent {
	var out []Extent
	for _, l := range d.lines {
		if l.kind == lineExtent {
			out = append(out, l.extent)
		}
	}
	return out
}

// SetExtent replaces the i-th extent line with e in canonical form.
func (d *Descriptor) SetExtent(i int, e Extent) error {
	if err := validateExtent(e); err != nil {
		return err
	}
	for k := range d.lines {
		if d.lines[k].kind != lineExtent {
			continue
		}
		if i == 0 {
			d.lines[k].text = e.String()
			d.lines[k].extent = e
			return nil
		}
		i--
	}
	return fmt.Errorf("descriptor: no extent %d", i)
}

func validateExtent(e Extent) error {
	switch e.Access {
	case AccessRW, AccessRDONLY, AccessNOACCESS:
	default:
		return fmt.Errorf("descriptor: extent access %q invalid", e.Access)
	}
	if e.Sectors < 0 || e.Sectors > maxSectors || e.Offset < 0 || e.Offset > maxSectors {
		return errors.New("descriptor: extent sectors or offset out of range")
	}
	if e.Type == "" || strings.ContainsAny(e.Type, " \t\"\r\n") {
		return fmt.Errorf("descriptor: extent type %q invalid", e.Type)
	}
	if strings.ContainsAny(e.Filename, "\"\r\n\x00") {
		return fmt.Errorf("descriptor: extent file name %q invalid", e.Filename)
	}
	return nil
}

// Get returns the value of a header key or ddb.* key (matched without
// regard to case), with surrounding quotes removed.
func (d *Descriptor) Get(key string) (string, bool) {
	if i := d.find(key); i >= 0 {
		l := d.lines[i]
		return l.text[l.valStart:l.valEnd], true
	}
	return "", false
}

// Keys returns header and ddb keys in file order.
func (d *Descriptor) Keys() []string {
	var out []string
	for _, l := range d.lines {
		if l.kind == lineHeader || l.kind == lineDDB {
			out = append(out, l.key)
		}
	}
	return out
}

func (d *Descriptor) find(key string) int {
	for i := len(d.lines) - 1; i >= 0; i-- {
		l := d.lines[i]
		if (l.kind == lineHeader || l.kind == lineDDB) && strings.EqualFold(l.key, key) {
			return i
		}
	}
	return -1
}

// unquotedHeader lists the header keys VMware writes without quotes.
var unquotedHeader = map[string]bool{"version": true, "cid": true, "parentcid": true}

// Set sets a header or ddb.* key. An existing line keeps its position,
// spacing and quoting; a new header key is inserted after the last header
// line (before the extent section), a new ddb key after the last ddb line.
func (d *Descriptor) Set(key, value string) error {
	if key == "" || strings.ContainsAny(key, "= \t\"\r\n\x00#") {
		return fmt.Errorf("descriptor: invalid key %q", key)
	}
	if strings.ContainsAny(value, "\"\r\n\x00") {
		return fmt.Errorf("descriptor: %s: value may not contain quotes, newlines or NUL", key)
	}
	if i := d.find(key); i >= 0 {
		l := &d.lines[i]
		l.text = l.text[:l.valStart] + value + l.text[l.valEnd:]
		l.valEnd = l.valStart + len(value)
		return nil
	}
	var text string
	var at int
	if isDDBKey(key) {
		text = key + ` = "` + value + `"`
		at = d.ddbInsertPoint()
	} else {
		if unquotedHeader[strings.ToLower(key)] {
			text = key + "=" + value
		} else {
			text = key + `="` + value + `"`
		}
		at = d.headerInsertPoint()
	}
	l, err := parseLine(text)
	if err != nil {
		return err // cannot happen for validated input
	}
	d.insert(at, l)
	return nil
}

// Delete removes every line carrying key and reports whether one existed.
func (d *Descriptor) Delete(key string) bool {
	found := false
	for i := d.find(key); i >= 0; i = d.find(key) {
		// Keep the terminator discipline: if the last line goes, the new
		// last line takes over its (possibly empty) terminator.
		if i == len(d.lines)-1 && i > 0 {
			d.lines[i-1].eol = d.lines[i].eol
		}
		d.lines = append(d.lines[:i], d.lines[i+1:]...)
		found = true
	}
	return found
}

func (d *Descriptor) headerInsertPoint() int {
	last := -1
	for i, l := range d.lines {
		if l.kind == lineHeader {
			last = i
		}
		if l.kind == lineExtent || l.kind == lineDDB {
			break
		}
	}
	if last >= 0 {
		return last + 1
	}
	// No header yet: go before the first extent/ddb line and before the
	// comments and blanks that introduce it, but after the leading comment.
	i := 0
	for i < len(d.lines) && d.lines[i].kind != lineExtent && d.lines[i].kind != lineDDB {
		i++
	}
	for i > 0 && (d.lines[i-1].kind == lineComment || d.lines[i-1].kind == lineBlank) {
		i--
	}
	if i == 0 && len(d.lines) > 0 && d.lines[0].kind == lineComment {
		i = 1
	}
	return i
}

func (d *Descriptor) ddbInsertPoint() int {
	for i := len(d.lines) - 1; i >= 0; i-- {
		if d.lines[i].kind == lineDDB {
			return i + 1
		}
	}
	return len(d.lines)
}

// insert puts l at index at, choosing a terminator that matches the file.
func (d *Descriptor) insert(at int, l line) {
	eol := "\n"
	for _, x := range d.lines {
		if x.eol != "" {
			eol = x.eol
			break
		}
	}
	l.eol = eol
	if at == len(d.lines) && at > 0 && d.lines[at-1].eol == "" {
		// Appending after an unterminated last line: terminate it and
		// leave the new last line unterminated, as the file was.
		d.lines[at-1].eol = eol
		l.eol = ""
	}
	d.lines = append(d.lines, line{})
	copy(d.lines[at+1:], d.lines[at:])
	d.lines[at] = l
}

// Typed header accessors.

// CreateType returns the createType header (e.g. "monolithicSparse").
func (d *Descriptor) CreateType() string {
	v, _ := d.Get("createType")
	return v
}

// CID returns the content id header.
func (d *Descriptor) CID() (uint32, error) { return d.hexHeader("CID") }

// ParentCID returns the parent content id; 0xffffffff means no parent.
func (d *Descriptor) ParentCID() (uint32, error) { return d.hexHeader("parentCID") }

// SetCID sets the CID header as 8 hex digits.
func (d *Descriptor) SetCID(cid uint32) error { return d.Set("CID", fmt.Sprintf("%08x", cid)) }

func (d *Descriptor) hexHeader(k string) (uint32, error) {
	v, ok := d.Get(k)
	if !ok {
		return 0, fmt.Errorf("descriptor: no %s", k)
	}
	n, err := strconv.ParseUint(v, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("descriptor: %s %q: %w", k, v, err)
	}
	return uint32(n), nil
}

// ParentFileNameHint returns the parent disk of a delta disk, if any.
func (d *Descriptor) ParentFileNameHint() (string, bool) { return d.Get("parentFileNameHint") }

// EncryptionKeys parses the encryptionKeys header with govmomi's
// KeyLocator codec (through formats/keylocator: a codec panic is an
// error). It returns nil, nil when the header is absent or empty.
func (d *Descriptor) EncryptionKeys() (*crypto.KeyLocator, error) {
	v, ok := d.Get("encryptionKeys")
	if !ok || v == "" {
		return nil, nil
	}
	kl, err := keylocator.Parse(v)
	if err != nil {
		return nil, fmt.Errorf("descriptor: encryptionKeys: %w", err)
	}
	return kl, nil
}

// SetEncryptionKeys writes the encryptionKeys header; nil removes it.
func (d *Descriptor) SetEncryptionKeys(kl *crypto.KeyLocator) error {
	if kl == nil {
		d.Delete("encryptionKeys")
		return nil
	}
	b, err := kl.MarshalText()
	if err != nil {
		return fmt.Errorf("descriptor: encryptionKeys: %w", err)
	}
	return d.Set("encryptionKeys", string(b))
}

// Package vmx reads and writes VMware configuration dictionaries: .vmx
// files and snapshot descriptors (.vmsd), which share one syntax:
//
//	# comment
//	key = "value"
//
// Keys are case-insensitive. Inside quotes VMware writes a byte it cannot
// put there literally as '|' followed by two hex digits: |22 for '"', |7C
// for '|', |0A for a newline. Get and Set work on decoded values; the file
// text is kept line by line, so Bytes gives back the input exactly until a
// line is changed, and a changed line keeps its place.
package vmx

import (
	"bytes"
	"fmt"
	"io"
	"strings"
)

// MaxSize bounds the input; real .vmx files are a few KiB, a .vmsd of 32
// snapshots some tens of KiB.
const MaxSize = 4 << 20

// MaxLines bounds the lines of the input, so that parsing costs a bounded
// amount of memory whatever the input (each line is a small struct).
const MaxLines = 1 << 17

// lineKind classifies a line.
type lineKind int

const (
	lineBlank   lineKind = iota
	lineComment          // first non-blank character is '#'
	linePair             // key = value
	lineUnknown          // anything else, kept verbatim
)

type line struct {
	kind     lineKind
	text     string // without terminator
	eol      string // "\n", "\r\n" or ""
	key      string
	valStart int // raw (still escaped) value is text[valStart:valEnd]
	valEnd   int
	quoted   bool
}

// File is a parsed configuration dictionary.
type File struct {
	lines []line
	// idx maps a lower-cased key to the index of its last line. It is
	// built on first lookup and dropped when lines move, so that helpers
	// that look up many keys stay linear on a large (hostile) file.
	idx map[string]int
}

// Parse parses a .vmx or .vmsd file. Lines that are not key = value pairs,
// comments or blanks are kept as lineUnknown rather than rejected, so that
// a file VMware accepts is never refused here.
func Parse(b []byte) (*File, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("vmx: %d bytes exceeds limit of %d", len(b), MaxSize)
	}
	n := bytes.Count(b, []byte("\n"))
	if len(b) > 0 && b[len(b)-1] != '\n' {
		n++ // a last line without terminator
	}
	if n > MaxLines {
		return nil, fmt.Errorf("vmx: more than %d lines", MaxLines)
	}
	f := &File{lines: make([]line, 0, n)}
	s := string(b)
	for len(s) > 0 {
		var text, eol string
		if i := strings.IndexByte(s, '\n'); i >= 0 {
			text, s, eol = s[:i], s[i+1:], "\n"
			if strings.HasSuffix(text, "\r") {
				text, eol = text[:len(text)-1], "\r\n"
			}
		} else {
			text, s = s, ""
		}
		l := parseLine(text)
		l.eol = eol
		f.lines = append(f.lines, l)
	}
	return f, nil
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' }

func parseLine(text string) line {
	l := line{text: text, kind: lineUnknown}
	i := 0
	for i < len(text) && isSpace(text[i]) {
		i++
	}
	switch {
	case i == len(text):
		l.kind = lineBlank
		return l
	case text[i] == '#':
		l.kind = lineComment
		return l
	}
	k := i
	for i < len(text) && !isSpace(text[i]) && text[i] != '=' && text[i] != '"' && text[i] != '#' {
		i++
	}
	key := text[k:i]
	for i < len(text) && isSpace(text[i]) {
		i++
	}
	if key == "" || i == len(text) || text[i] != '=' {
		return l
	}
	i++
	for i < len(text) && isSpace(text[i]) {
		i++
	}
	var start, end int
	quoted := i < len(text) && text[i] == '"'
	if quoted {
		j := strings.IndexByte(text[i+1:], '"')
		if j < 0 {
			return l
		}
		start, end = i+1, i+1+j
		i = end + 1
	} else {
		start = i
		for i < len(text) && !isSpace(text[i]) && text[i] != '#' && text[i] != '"' {
			i++
		}
		end = i
	}
	// Only white space or a comment may follow the value.
	for i < len(text) && isSpace(text[i]) {
		i++
	}
	if i < len(text) && text[i] != '#' {
		return l
	}
	l.kind, l.key, l.valStart, l.valEnd, l.quoted = linePair, key, start, end, quoted
	return l
}

// Bytes returns the file text.
func (f *File) Bytes() []byte {
	var b bytes.Buffer
	f.WriteTo(&b)
	return b.Bytes()
}

// WriteTo writes the file text to w.
func (f *File) WriteTo(w io.Writer) (int64, error) {
	var n int64
	for _, l := range f.lines {
		k, err := io.WriteString(w, l.text+l.eol)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// Keys returns the keys in file order (duplicates included).
func (f *File) Keys() []string {
	var out []string
	for _, l := range f.lines {
		if l.kind == linePair {
			out = append(out, l.key)
		}
	}
	return out
}

// find returns the index of the last line with key; VMware lets a later
// duplicate override an earlier one.
func (f *File) find(key string) int {
	if f.idx == nil {
		f.idx = make(map[string]int)
		for i, l := range f.lines {
			if l.kind == linePair {
				f.idx[strings.ToLower(l.key)] = i
			}
		}
	}
	if i, ok := f.idx[strings.ToLower(key)]; ok {
		return i
	}
	return -1
}

// Get returns the decoded value of key (case-insensitive).
func (f *File) Get(key string) (string, bool) {
	i := f.find(key)
	if i < 0 {
		return "", false
	}
	l := f.lines[i]
	return Unescape(l.text[l.valStart:l.valEnd]), true
}

// Has reports whether key is present.
func (f *File) Has(key string) bool { return f.find(key) >= 0 }

// Set sets key to value. An existing line keeps its position and spacing
// (an unquoted value becomes quoted); a new key is appended as
// `key = "value"`.
func (f *File) Set(key, value string) error {
	if !validKey(key) {
		return fmt.Errorf("vmx: invalid key %q", key)
	}
	enc := Escape(value)
	if i := f.find(key); i >= 0 {
		l := &f.lines[i]
		if l.quoted {
			l.text = l.text[:l.valStart] + enc + l.text[l.valEnd:]
			l.valEnd = l.valStart + len(enc)
		} else {
			l.text = l.text[:l.valStart] + `"` + enc + `"` + l.text[l.valEnd:]
			l.valStart++
			l.valEnd = l.valStart + len(enc)
			l.quoted = true
		}
		return nil
	}
	l := parseLine(key + ` = "` + enc + `"`)
	l.eol = "\n"
	for _, x := range f.lines {
		if x.eol != "" {
			l.eol = x.eol
			break
		}
	}
	if n := len(f.lines); n > 0 && f.lines[n-1].eol == "" {
		f.lines[n-1].eol = l.eol
	}
	f.lines = append(f.lines, l)
	if f.idx != nil {
		f.idx[strings.ToLower(key)] = len(f.lines) - 1
	}
	return nil
}

func validKey(k string) bool {
	return k != "" && !strings.ContainsAny(k, " \t\r\n=\"#\x00")
}

// Delete removes every line with key and reports whether one existed.
func (f *File) Delete(key string) bool {
	found := false
	for i := f.find(key); i >= 0; i = f.find(key) {
		if i == len(f.lines)-1 && i > 0 {
			f.lines[i-1].eol = f.lines[i].eol
		}
		f.lines = append(f.lines[:i], f.lines[i+1:]...)
		f.idx = nil // indices moved
		found = true
	}
	return found
}

// Escape encodes a value for use between quotes: '"', '|', control
// characters and DEL become |XX (upper-case hex). Other bytes, UTF-8
// included, are written as they are.
func Escape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '"' || c == '|' || c < 0x20 || c == 0x7f {
			fmt.Fprintf(&b, "|%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// Unescape decodes |XX sequences (either hex case). A '|' not followed by
// two hex digits is taken literally, as VMware does.
func Unescape(s string) string {
	if !strings.Contains(s, "|") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '|' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]) {
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

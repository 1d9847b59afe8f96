package vmx

import (
	"bytes"
	"sort"
	"strings"
)

// Sensitive vmx lines (guestinfo.*, machine.id, annotation) move out of an
// encrypted VM's vmx into its encryption.data bundle, and back on
// decryption, byte for byte (docs/FORMAT.md 4.2). The sealing is the
// engine's; which lines, and how they are cut out and put back, is here.

// IsSensitiveKey reports whether a vmx key's line moves into the bundle.
func IsSensitiveKey(key string) bool {
	k := strings.ToLower(key)
	return strings.HasPrefix(k, "guestinfo.") || k == "machine.id" || k == "annotation"
}

// splitTextLines splits text into lines that keep their terminators.
func splitTextLines(b []byte) [][]byte {
	var out [][]byte
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			out = append(out, b)
			break
		}
		out = append(out, b[:i+1])
		b = b[i+1:]
	}
	return out
}

// textLineKey returns the key of a `key = value` line, or "".
func textLineKey(l []byte) string {
	s := strings.TrimLeft(string(l), " \t")
	if s == "" || s[0] == '#' {
		return ""
	}
	i := strings.IndexByte(s, '=')
	if i <= 0 {
		return ""
	}
	return strings.TrimSpace(s[:i])
}

// MovedLine is a vmx line taken out of the text: its 0-based line index
// in the original file and its bytes, terminator included.
type MovedLine struct {
	Index int
	Raw   []byte
}

// ExtractSensitive removes the sensitive lines (IsSensitiveKey) from vmx
// text: the vmx `encryption.data` bundle holds them (FORMAT.md 4.2).
func ExtractSensitive(text []byte) (rest []byte, moved []MovedLine) {
	for i, l := range splitTextLines(text) {
		if k := textLineKey(l); k != "" && IsSensitiveKey(k) {
			moved = append(moved, MovedLine{Index: i, Raw: append([]byte(nil), l...)})
			continue
		}
		rest = append(rest, l...)
	}
	return rest, moved
}

// RestoreSensitive puts moved lines back at their original positions.
func RestoreSensitive(text []byte, moved []MovedLine) []byte {
	sort.Slice(moved, func(i, j int) bool { return moved[i].Index < moved[j].Index })
	lines := splitTextLines(text)
	for _, m := range moved {
		at := min(m.Index, len(lines))
		// A line that had no terminator was last; if lines now follow it,
		// the one before must end with a newline.
		if at > 0 && !bytes.HasSuffix(lines[at-1], []byte("\n")) {
			lines[at-1] = append(append([]byte(nil), lines[at-1]...), '\n')
		}
		lines = append(lines[:at], append([][]byte{m.Raw}, lines[at:]...)...)
	}
	return bytes.Join(lines, nil)
}

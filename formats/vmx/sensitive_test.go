package vmx

import (
	"bytes"
	"testing"
)

// TestSensitiveRoundTrip: which lines move out, and that putting them back
// restores the text byte for byte (last line without a newline, CRLF,
// comments, keys in any case).
func TestSensitiveRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		text  string
		rest  string
		moved int
	}{
		{"a = \"1\"\nguestinfo.x = \"s\"\nb = \"2\"\n", "a = \"1\"\nb = \"2\"\n", 1},
		{"GuestInfo.Y = \"s\"\r\nmachine.id = \"m\"\r\nz = \"3\"", "z = \"3\"", 2},
		{"a = \"1\"\nannotation = \"last, no newline\"", "a = \"1\"\n", 1},
		{"# guestinfo.x = \"comment\"\nguestinfox = \"not sensitive\"\n", "# guestinfo.x = \"comment\"\nguestinfox = \"not sensitive\"\n", 0},
		{"", "", 0},
	} {
		rest, moved := ExtractSensitive([]byte(tc.text))
		if string(rest) != tc.rest || len(moved) != tc.moved {
			t.Errorf("ExtractSensitive(%q) = %q, %d lines; want %q, %d", tc.text, rest, len(moved), tc.rest, tc.moved)
		}
		if back := RestoreSensitive(rest, moved); !bytes.Equal(back, []byte(tc.text)) {
			t.Errorf("RestoreSensitive gave %q, want %q", back, tc.text)
		}
	}
}

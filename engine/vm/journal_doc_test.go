package vm

import (
	"os"
	"reflect"
	"strings"
	"testing"
)

// TestJournalMembersDocumented fails when a member of the journal is not
// in FORMAT.md's journal table (section 5.1), so the file and its
// specification cannot drift.
func TestJournalMembersDocumented(t *testing.T) {
	doc, err := os.ReadFile("../../docs/FORMAT.md")
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(doc), "The journal, `.vmcryptd-journal.json`")
	if i < 0 {
		t.Fatal("FORMAT.md has no journal specification")
	}
	table := string(doc[i:])
	table = table[:strings.Index(table, "Unknown members are ignored.")]
	for _, typ := range []reflect.Type{reflect.TypeOf(Journal{}), reflect.TypeOf(JournalDisk{})} {
		for f := range typ.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if !strings.Contains(table, "`"+name+"`") {
				t.Errorf("journal member %q (%s.%s) is not in FORMAT.md", name, typ.Name(), f.Name)
			}
		}
	}
}

package engine

import (
	"errors"
	"os"
	"strings"
	"testing"
)

// trustHead is the first HeaderSize bytes of a container of kind k bound
// to b (both slots; unauthenticated facts are all decideTrust reads).
func trustHead(t *testing.T, k Kind, b Binding) []byte {
	t.Helper()
	head := make([]byte, HeaderSize)
	for slot := 0; slot < 2; slot++ {
		h := &Header{Kind: k, Seq: 1, Size: 4096, UnitSize: 4096, PayloadOff: HeaderSize, FileID: [16]byte{9}, Binding: b}
		s, err := marshalSlot(h, slot, make([]byte, 32))
		if err != nil {
			t.Fatal(err)
		}
		copy(head[slot*slotSize:], s)
	}
	return head
}

type trustFactsRow struct {
	nlink     uint64
	made      bool
	described *disk
	descErr   error
	copies    bool
	noVMX     bool
}

// trustRow is one row of TestTrustRule.
type trustRow struct {
	clause Clause
	name   string
	layout *vmLayout
	lerr   error
	head   []byte
	f      trustFactsRow
	want   role // v, clause; for containers ks, owner, purpose, kind too
}

var trustDiskB = Binding{PurposeDisk, "disk1"}

// trustRows are the rows of TestTrustRule: one or more per clause.
func trustRows(t *testing.T) []trustRow {
	vmB := Binding{PurposeVM, "vm1"}
	diskB := trustDiskB
	coreB := Binding{PurposeCoreDump, "host"}
	encDisk := &disk{Name: "d.vmdk", Extents: []string{"d-flat.vmdk"}, DiskID: "disk1", KeySafe: "DISK-KS"}
	plainDisk := &disk{Name: "p.vmdk", Extents: []string{"p-flat.vmdk"}}
	noIDDisk := &disk{Name: "n.vmdk", Extents: []string{"n-flat.vmdk"}, KeySafe: "N-KS"}
	encVM := &vmLayout{Dir: "/ds/vm", Encrypted: true, VMID: "vm1", KeySafe: "VM-KS",
		Disks: []*disk{encDisk, plainDisk, noIDDisk}, Files: []dataFile{{"vm.nvram", KindNVRAM}, {"vm.vswp", KindVSWP}},
		CoreDumps: []string{"vmware-vmx-7.core"}}
	plainVM := &vmLayout{Dir: "/ds/p", Disks: []*disk{encDisk, plainDisk}, Files: []dataFile{{"vm.nvram", KindNVRAM}}}

	type facts = trustFactsRow
	return []trustRow{
		{ClauseNotContainer, "notes.txt", encVM, nil, []byte("hello"), facts{},
			role{v: verdictPlain}},
		{ClauseEncryptedExtent, "d-flat.vmdk", encVM, nil, trustHead(t, KindExtent, diskB), facts{nlink: 3},
			role{v: verdictContainer, ks: "DISK-KS", owner: diskB, kind: KindExtent}},
		{ClausePlainExtent, "p-flat.vmdk", encVM, nil, trustHead(t, KindExtent, diskB), facts{},
			role{v: verdictPlain}},
		{ClauseLostKeyLines, "p-flat.vmdk", encVM, nil, trustHead(t, KindExtent, diskB), facts{copies: true},
			role{v: verdictSuspect}},
		{ClauseDiskWithoutID, "n-flat.vmdk", encVM, nil, trustHead(t, KindExtent, diskB), facts{},
			role{v: verdictSuspect}},
		{ClauseEncryptedDiskPlainVM, "d-flat.vmdk", plainVM, nil, trustHead(t, KindExtent, diskB), facts{},
			role{v: verdictSuspect}},
		{ClauseVMKeyFile, "vm.nvram", encVM, nil, trustHead(t, KindNVRAM, vmB), facts{nlink: 2},
			role{v: verdictContainer, ks: "VM-KS", owner: vmB, kind: KindNVRAM}},
		{ClausePlainVMFile, "vm.nvram", plainVM, nil, trustHead(t, KindNVRAM, diskB), facts{},
			role{v: verdictPlain}},
		{ClauseNoSilentDowngrade, "vm.vswp", encVM, nil, []byte("plain swap bytes"), facts{},
			role{v: verdictSuspect}},
		{ClauseNoSilentDowngrade, "d-flat.vmdk", encVM, nil, nil, facts{}, // empty extent
			role{v: verdictSuspect}},
		{ClauseNoSilentDowngrade, "vm.nvram", plainVM, nil, trustHead(t, KindNVRAM, vmB), facts{}, // vmx lost its lines
			role{v: verdictSuspect}},
		{ClauseCoreDump, "vmware-vmx-7.core", encVM, nil, trustHead(t, KindCoreDump, coreB), facts{nlink: 1},
			role{v: verdictContainer, purpose: PurposeCoreDump, kind: KindCoreDump}},
		{ClauseHardLinks, "vmware-vmx-7.core", encVM, nil, trustHead(t, KindCoreDump, coreB), facts{nlink: 2},
			role{v: verdictSuspect}},
		{ClauseViewMadeDisk, "new.vmdk", encVM, nil, trustHead(t, KindExtent, diskB), facts{nlink: 1, made: true},
			role{v: verdictContainer, purpose: PurposeDisk, kind: KindExtent}},
		{ClauseHardLinks, "new.vmdk", encVM, nil, trustHead(t, KindExtent, diskB), facts{nlink: 2, made: true},
			role{v: verdictSuspect}},
		{ClauseDescribedDisk, "x-flat.vmdk", encVM, nil, trustHead(t, KindExtent, diskB),
			facts{described: &disk{Name: "x.vmdk", Extents: []string{"x-flat.vmdk"}, DiskID: "disk1", KeySafe: "X-KS"}},
			role{v: verdictContainer, ks: "X-KS", owner: diskB, kind: KindExtent}},
		{ClausePlainExtent, "y-flat.vmdk", encVM, nil, trustHead(t, KindExtent, diskB),
			facts{described: &disk{Name: "y.vmdk", Extents: []string{"y-flat.vmdk"}}},
			role{v: verdictPlain}},
		{ClauseUnattachedDisk, "lost.vmdk", encVM, nil, trustHead(t, KindExtent, diskB), facts{},
			role{v: verdictSuspect}},
		{ClauseUnattachedDisk, "two.vmdk", encVM, nil, trustHead(t, KindExtent, diskB), facts{descErr: errors.New("named by two descriptors")},
			role{v: verdictSuspect}},
		{ClauseAnythingElse, "floppy.img", encVM, nil, trustHead(t, KindExtent, diskB), facts{},
			role{v: verdictPlain}},
		{ClauseAnythingElse, "new.vmdk", plainVM, nil, trustHead(t, KindExtent, diskB), facts{made: true},
			role{v: verdictPlain}},
		{ClauseUnreadableVM, "d-flat.vmdk", nil, errors.New("two vmx files"), trustHead(t, KindExtent, diskB), facts{},
			role{v: verdictSuspect}},
		{ClauseNotContainer, "d-flat.vmdk", nil, errors.New("two vmx files"), []byte("guest data"), facts{},
			role{v: verdictPlain}},
		{ClauseNoVMX, "data.bin", nil, os.ErrNotExist, trustHead(t, KindCoreDump, coreB), facts{noVMX: true},
			role{v: verdictPlain}},
		{ClauseCoreDump, "core.1234", nil, os.ErrNotExist, trustHead(t, KindCoreDump, coreB), facts{noVMX: true, nlink: 1},
			role{v: verdictContainer, purpose: PurposeCoreDump, kind: KindCoreDump}},
		{ClauseCoreDump, "crash.dmp", nil, os.ErrNotExist, trustHead(t, KindCoreDump, coreB), facts{noVMX: true, nlink: 1},
			role{v: verdictContainer, purpose: PurposeCoreDump, kind: KindCoreDump}},
	}
}

// TestTrustRule is the FORMAT.md section 5 decision, one row per clause:
// a VM layout and the facts about one file, and the verdict expected. No
// VM is built and nothing touches the disk.
func TestTrustRule(t *testing.T) {
	for _, tc := range trustRows(t) {
		t.Run(string(tc.clause)+"/"+tc.name, func(t *testing.T) {
			f := tc.f
			got := decideTrust(trustFacts{
				Name: tc.name, Head: tc.head, Layout: tc.layout, LayoutErr: tc.lerr,
				CorePatterns: []string{"*.dmp"},
				NoVMX:        func() bool { return f.noVMX },
				Nlink:        func() (uint64, error) { return f.nlink, nil },
				MadeByView:   func([16]byte) bool { return f.made },
				DescribedBy:  func() (*disk, bool, error) { return f.described, f.described != nil, f.descErr },
				ExtentCopies: func(*disk) (Binding, bool) { return trustDiskB, f.copies },
			})
			want := tc.want
			want.clause = tc.clause
			if got.v != want.v || got.clause != want.clause {
				t.Fatalf("verdict %d clause %s (%s), want %d clause %s", got.v, got.clause, got.why, want.v, want.clause)
			}
			if got.v == verdictSuspect && got.why == "" {
				t.Fatalf("refusal without a reason")
			}
			if got.v == verdictContainer && (got.ks != want.ks || got.owner != want.owner || got.purpose != want.purpose || got.kind != want.kind) {
				t.Fatalf("container role %+v, want %+v", got, want)
			}
		})
	}
}

// TestKindFits: the last clause; a mismatch is a refusal naming both kinds.
func TestKindFits(t *testing.T) {
	for _, tc := range []struct {
		want, got Kind
		ok        bool
	}{
		{KindNVRAM, KindNVRAM, true},
		{KindNVRAM, KindVSWP, false},
		{KindExtent, KindCoreDump, false},
		{KindCoreDump, KindCoreDump, true},
	} {
		err := kindFits("vm/f", role{v: verdictContainer, kind: tc.want}, tc.got)
		if (err == nil) != tc.ok {
			t.Errorf("kindFits(%s, %s) = %v", tc.want, tc.got, err)
		}
		if err != nil && (!errors.Is(err, ErrRefused) || !errors.Is(err, ErrKindMismatch) || !strings.Contains(err.Error(), tc.got.String())) {
			t.Errorf("kindFits(%s, %s): %v is not a kind refusal naming the kind", tc.want, tc.got, err)
		}
	}
}

// TestEveryClauseDocumented: each clause has a TestTrustRule row (checked
// by name here) and is named in FORMAT.md section 5, so the document, the
// code and the logs use the same words.
func TestEveryClauseDocumented(t *testing.T) {
	doc, err := os.ReadFile("../docs/FORMAT.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(doc)
	start := strings.Index(s, "## 5. Telling encrypted from plain")
	end := strings.Index(s, "### 5.1 Conversions")
	if start < 0 || end < start {
		t.Fatal("FORMAT.md section 5 not found")
	}
	sec := s[start:end]
	rows := map[Clause]bool{ClauseKind: true} // ClauseKind: TestKindFits
	for _, r := range trustRows(t) {
		rows[r.clause] = true
	}
	for _, c := range allClauses {
		if !strings.Contains(sec, "`"+string(c)+"`") {
			t.Errorf("clause %s is not named in FORMAT.md section 5", c)
		}
		if !rows[c] {
			t.Errorf("clause %s has no TestTrustRule row", c)
		}
	}
}

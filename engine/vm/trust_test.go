package vm

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
)

// trustHead is the first HeaderSize bytes of a container of kind k bound
// to b (both slots; unauthenticated facts are all Decide reads).
func trustHead(t *testing.T, k container.Kind, b keys.Binding) []byte {
	t.Helper()
	head := make([]byte, container.HeaderSize)
	for slot := 0; slot < 2; slot++ {
		h := &container.Header{Kind: k, Seq: 1, Size: 4096, UnitSize: 4096, PayloadOff: container.HeaderSize, FileID: [16]byte{9}, Binding: b}
		s, err := container.MarshalSlot(h, slot, make([]byte, 32))
		if err != nil {
			t.Fatal(err)
		}
		copy(head[slot*container.SlotSize:], s)
	}
	return head
}

type trustFactsRow struct {
	nlink     uint64
	made      bool
	described *Disk
	descErr   error
	copies    bool
	noVMX     bool
}

// trustRow is one row of TestTrustRule.
type trustRow struct {
	clause Clause
	name   string
	layout *Layout
	lerr   error
	head   []byte
	f      trustFactsRow
	want   Role // v, clause; for containers ks, owner, purpose, kind too
}

var trustDiskB = keys.Binding{Purpose: keys.PurposeDisk, OwnerID: "disk1"}

// trustRows are the rows of TestTrustRule: one or more per clause.
func trustRows(t *testing.T) []trustRow {
	vmB := keys.Binding{Purpose: keys.PurposeVM, OwnerID: "vm1"}
	diskB := trustDiskB
	coreB := keys.Binding{Purpose: keys.PurposeCoreDump, OwnerID: "host"}
	encDisk := &Disk{Name: "d.vmdk", Extents: []string{"d-flat.vmdk"}, DiskID: "disk1", KeySafe: "DISK-KS"}
	plainDisk := &Disk{Name: "p.vmdk", Extents: []string{"p-flat.vmdk"}}
	noIDDisk := &Disk{Name: "n.vmdk", Extents: []string{"n-flat.vmdk"}, KeySafe: "N-KS"}
	encVM := &Layout{Dir: "/ds/vm", Encrypted: true, VMID: "vm1", KeySafe: "VM-KS",
		Disks: []*Disk{encDisk, plainDisk, noIDDisk}, Files: []DataFile{{"vm.nvram", container.KindNVRAM}, {"vm.vswp", container.KindVSWP}},
		CoreDumps: []string{"vmware-vmx-7.core"}}
	plainVM := &Layout{Dir: "/ds/p", Disks: []*Disk{encDisk, plainDisk}, Files: []DataFile{{"vm.nvram", container.KindNVRAM}}}

	type facts = trustFactsRow
	return []trustRow{
		{ClauseNotContainer, "notes.txt", encVM, nil, []byte("hello"), facts{},
			Role{Verdict: VerdictPlain}},
		{ClauseEncryptedExtent, "d-flat.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB), facts{nlink: 3},
			Role{Verdict: verdictContainer, KeySafe: "DISK-KS", Owner: diskB, Kind: container.KindExtent}},
		{ClausePlainExtent, "p-flat.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB), facts{},
			Role{Verdict: VerdictPlain}},
		{ClauseLostKeyLines, "p-flat.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB), facts{copies: true},
			Role{Verdict: VerdictSuspect}},
		{ClauseDiskWithoutID, "n-flat.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB), facts{},
			Role{Verdict: VerdictSuspect}},
		{ClauseEncryptedDiskPlainVM, "d-flat.vmdk", plainVM, nil, trustHead(t, container.KindExtent, diskB), facts{},
			Role{Verdict: VerdictSuspect}},
		{ClauseVMKeyFile, "vm.nvram", encVM, nil, trustHead(t, container.KindNVRAM, vmB), facts{nlink: 2},
			Role{Verdict: verdictContainer, KeySafe: "VM-KS", Owner: vmB, Kind: container.KindNVRAM}},
		{ClausePlainVMFile, "vm.nvram", plainVM, nil, trustHead(t, container.KindNVRAM, diskB), facts{},
			Role{Verdict: VerdictPlain}},
		{ClauseNoSilentDowngrade, "vm.vswp", encVM, nil, []byte("plain swap bytes"), facts{},
			Role{Verdict: VerdictSuspect}},
		{ClauseNoSilentDowngrade, "d-flat.vmdk", encVM, nil, nil, facts{}, // empty extent
			Role{Verdict: VerdictSuspect}},
		{ClauseNoSilentDowngrade, "vm.nvram", plainVM, nil, trustHead(t, container.KindNVRAM, vmB), facts{}, // vmx lost its lines
			Role{Verdict: VerdictSuspect}},
		{ClauseCoreDump, "vmware-vmx-7.core", encVM, nil, trustHead(t, container.KindCoreDump, coreB), facts{nlink: 1},
			Role{Verdict: verdictContainer, Purpose: keys.PurposeCoreDump, Kind: container.KindCoreDump}},
		{ClauseHardLinks, "vmware-vmx-7.core", encVM, nil, trustHead(t, container.KindCoreDump, coreB), facts{nlink: 2},
			Role{Verdict: VerdictSuspect}},
		{ClauseViewMadeDisk, "new.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB), facts{nlink: 1, made: true},
			Role{Verdict: verdictContainer, Purpose: keys.PurposeDisk, Kind: container.KindExtent}},
		{ClauseHardLinks, "new.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB), facts{nlink: 2, made: true},
			Role{Verdict: VerdictSuspect}},
		{ClauseDescribedDisk, "x-flat.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB),
			facts{described: &Disk{Name: "x.vmdk", Extents: []string{"x-flat.vmdk"}, DiskID: "disk1", KeySafe: "X-KS"}},
			Role{Verdict: verdictContainer, KeySafe: "X-KS", Owner: diskB, Kind: container.KindExtent}},
		{ClausePlainExtent, "y-flat.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB),
			facts{described: &Disk{Name: "y.vmdk", Extents: []string{"y-flat.vmdk"}}},
			Role{Verdict: VerdictPlain}},
		{ClauseUnattachedDisk, "lost.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB), facts{},
			Role{Verdict: VerdictSuspect}},
		{ClauseUnattachedDisk, "two.vmdk", encVM, nil, trustHead(t, container.KindExtent, diskB), facts{descErr: errors.New("named by two descriptors")},
			Role{Verdict: VerdictSuspect}},
		{ClauseAnythingElse, "floppy.img", encVM, nil, trustHead(t, container.KindExtent, diskB), facts{},
			Role{Verdict: VerdictPlain}},
		{ClauseAnythingElse, "new.vmdk", plainVM, nil, trustHead(t, container.KindExtent, diskB), facts{made: true},
			Role{Verdict: VerdictPlain}},
		{ClauseUnreadableVM, "d-flat.vmdk", nil, errors.New("two vmx files"), trustHead(t, container.KindExtent, diskB), facts{},
			Role{Verdict: VerdictSuspect}},
		{ClauseNotContainer, "d-flat.vmdk", nil, errors.New("two vmx files"), []byte("guest data"), facts{},
			Role{Verdict: VerdictPlain}},
		{ClauseNoVMX, "data.bin", nil, os.ErrNotExist, trustHead(t, container.KindCoreDump, coreB), facts{noVMX: true},
			Role{Verdict: VerdictPlain}},
		{ClauseCoreDump, "core.1234", nil, os.ErrNotExist, trustHead(t, container.KindCoreDump, coreB), facts{noVMX: true, nlink: 1},
			Role{Verdict: verdictContainer, Purpose: keys.PurposeCoreDump, Kind: container.KindCoreDump}},
		{ClauseCoreDump, "crash.dmp", nil, os.ErrNotExist, trustHead(t, container.KindCoreDump, coreB), facts{noVMX: true, nlink: 1},
			Role{Verdict: verdictContainer, Purpose: keys.PurposeCoreDump, Kind: container.KindCoreDump}},
	}
}

// TestTrustRule is the FORMAT.md section 5 decision, one row per clause:
// a VM layout and the facts about one file, and the verdict expected. No
// VM is built and nothing touches the disk.
func TestTrustRule(t *testing.T) {
	for _, tc := range trustRows(t) {
		t.Run(string(tc.clause)+"/"+tc.name, func(t *testing.T) {
			f := tc.f
			got := Decide(Facts{
				Name: tc.name, Head: tc.head, Layout: tc.layout, LayoutErr: tc.lerr,
				CorePatterns: []string{"*.dmp"},
				NoVMX:        func() bool { return f.noVMX },
				Nlink:        func() (uint64, error) { return f.nlink, nil },
				MadeByView:   func([16]byte) bool { return f.made },
				DescribedBy:  func() (*Disk, bool, error) { return f.described, f.described != nil, f.descErr },
				ExtentCopies: func(*Disk) (keys.Binding, bool) { return trustDiskB, f.copies },
			})
			want := tc.want
			want.clause = tc.clause
			if got.Verdict != want.Verdict || got.clause != want.clause {
				t.Fatalf("verdict %d clause %s (%s), want %d clause %s", got.Verdict, got.clause, got.why, want.Verdict, want.clause)
			}
			if got.Verdict == VerdictSuspect && got.why == "" {
				t.Fatalf("refusal without a reason")
			}
			if got.Verdict == verdictContainer && (got.KeySafe != want.KeySafe || got.Owner != want.Owner || got.Purpose != want.Purpose || got.Kind != want.Kind) {
				t.Fatalf("container role %+v, want %+v", got, want)
			}
		})
	}
}

// TestKindFits: the last clause; a mismatch is a refusal naming both kinds.
func TestKindFits(t *testing.T) {
	for _, tc := range []struct {
		want, got container.Kind
		ok        bool
	}{
		{container.KindNVRAM, container.KindNVRAM, true},
		{container.KindNVRAM, container.KindVSWP, false},
		{container.KindExtent, container.KindCoreDump, false},
		{container.KindCoreDump, container.KindCoreDump, true},
	} {
		err := KindFits("vm/f", Role{Verdict: verdictContainer, Kind: tc.want}, tc.got)
		if (err == nil) != tc.ok {
			t.Errorf("kindFits(%s, %s) = %v", tc.want, tc.got, err)
		}
		if err != nil && (!errors.Is(err, ErrRefused) || !errors.Is(err, container.ErrKindMismatch) || !strings.Contains(err.Error(), tc.got.String())) {
			t.Errorf("kindFits(%s, %s): %v is not a kind refusal naming the kind", tc.want, tc.got, err)
		}
	}
}

// TestEveryClauseDocumented: each clause has a TestTrustRule row (checked
// by name here) and is named in FORMAT.md section 5, so the document, the
// code and the logs use the same words.
func TestEveryClauseDocumented(t *testing.T) {
	doc, err := os.ReadFile("../../docs/FORMAT.md")
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

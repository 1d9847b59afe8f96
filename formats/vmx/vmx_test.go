package vmx

import (
	"bytes"
	"strings"
	"testing"

	"github.com/vmware/govmomi/crypto"
)

const sampleVMX = `.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "web |22prod|22 |7C eu"
# hand-written comment
guestOS = "ubuntu-64"
nvram = "web.nvram"
memSize = 4096
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web.vmdk"
scsi0:1.present = "FALSE"
scsi0:1.fileName = "web_1.vmdk"   # detached
sata0:0.present = "TRUE"
sata0:0.deviceType = "cdrom-image"
sata0:0.fileName = "/vmfs/volumes/iso/ubuntu.iso"
nvme0:0.present = "TRUE"
NVME0:0.FILENAME = "web_2.vmdk"
ide1:0.present = "true"
ide1:0.fileName = "legacy.vmdk"
annotation = "line one|0Aline two"
sched.swap.derivedName = "/vmfs/volumes/ds1/web/web-5c1f3a.vswp"
checkpoint.vmState = ""
uuid.bios = "56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc"
vc.uuid = "52 11 22 33 44 55 66 77-88 99 aa bb cc dd ee ff"
this line is not a pair
unknownFutureKey = "kept"
`

func TestRoundTrip(t *testing.T) {
	for name, text := range map[string]string{
		"sample":     sampleVMX,
		"crlf":       strings.ReplaceAll(sampleVMX, "\n", "\r\n"),
		"no newline": strings.TrimSuffix(sampleVMX, "\n"),
		"mixed":      "a = \"1\"\r\nb = \"2\"\n\r\n  \t\n#c\r\nweird = \"unterminated\nx=\"y\"z\n",
		"empty":      "",
		"vmsd":       sampleVMSD,
	} {
		t.Run(name, func(t *testing.T) {
			f, err := Parse([]byte(text))
			if err != nil {
				t.Fatal(err)
			}
			if got := string(f.Bytes()); got != text {
				t.Fatalf("round trip differs:\n%q\n%q", got, text)
			}
		})
	}
}

func TestGetSetDelete(t *testing.T) {
	f, _ := Parse([]byte(sampleVMX))
	for k, want := range map[string]string{
		"DISPLAYNAME":        `web "prod" | eu`,
		"annotation":         "line one\nline two",
		"memsize":            "4096",
		"scsi0:1.fileName":   "web_1.vmdk",
		"checkpoint.vmState": "",
		".encoding":          "UTF-8",
	} {
		if got, ok := f.Get(k); !ok || got != want {
			t.Errorf("Get(%q) = %q, %v; want %q", k, got, ok, want)
		}
	}
	if _, ok := f.Get("this"); ok {
		t.Error("unknown line parsed as a pair")
	}
	f.Set("displayName", `new "name"|x`)
	f.Set("memSize", "8192")
	f.Set("newKey", "tab\there")
	f.Delete("guestOS")
	out := string(f.Bytes())
	for _, want := range []string{
		"\ndisplayName = \"new |22name|22|7Cx\"\n# hand-written comment\n",
		"\nnvram = \"web.nvram\"\nmemSize = \"8192\"\n",
		"scsi0:1.fileName = \"web_1.vmdk\"   # detached\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if !strings.HasSuffix(out, "unknownFutureKey = \"kept\"\nnewKey = \"tab|09here\"\n") || strings.Contains(out, "guestOS") {
		t.Errorf("append/delete wrong:\n%s", out)
	}
	g, _ := Parse([]byte(out))
	if v, _ := g.Get("displayname"); v != `new "name"|x` {
		t.Errorf("re-read displayName %q", v)
	}
	if err := f.Set("bad key", "x"); err == nil {
		t.Error("key with space accepted")
	}
	// Appending to a file without final newline terminates the old last line.
	h, _ := Parse([]byte("a = \"1\"\r\nb = \"2\""))
	h.Set("c", "3")
	if got := string(h.Bytes()); got != "a = \"1\"\r\nb = \"2\"\r\nc = \"3\"\r\n" {
		t.Errorf("append after unterminated line: %q", got)
	}
	// Duplicates: the last one wins and is the one Set changes.
	d, _ := Parse([]byte("k = \"1\"\nK = \"2\"\n"))
	if v, _ := d.Get("k"); v != "2" {
		t.Errorf("duplicate Get = %q", v)
	}
	d.Set("k", "3")
	if got := string(d.Bytes()); got != "k = \"1\"\nK = \"3\"\n" {
		t.Errorf("duplicate Set: %q", got)
	}
}

func TestEscape(t *testing.T) {
	for _, tc := range [][2]string{
		{`a"b`, "a|22b"}, {"a|b", "a|7Cb"}, {"a\nb\r", "a|0Ab|0D"}, {"ünï", "ünï"}, {"", ""}, {"#x", "#x"},
	} {
		if got := Escape(tc[0]); got != tc[1] {
			t.Errorf("Escape(%q) = %q, want %q", tc[0], got, tc[1])
		}
		if got := Unescape(tc[1]); got != tc[0] {
			t.Errorf("Unescape(%q) = %q", tc[1], got)
		}
	}
	for in, want := range map[string]string{"|7c": "|", "a|": "a|", "|4": "|4", "|zz": "|zz", "|2": "|2", "x|41y": "xAy"} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestVMHelpers(t *testing.T) {
	f, _ := Parse([]byte(sampleVMX))
	if f.NVRAM() != "web.nvram" || f.Encoding() != "UTF-8" || f.SwapDerivedName() != "/vmfs/volumes/ds1/web/web-5c1f3a.vswp" {
		t.Error("file helpers")
	}
	if f.UUIDBios() == "" || f.VCUUID() == "" || f.CheckpointVMState() != "" {
		t.Error("uuid helpers")
	}
	disks := f.Disks()
	var got []string
	for _, d := range disks {
		got = append(got, d.Device+"="+d.FileName+":"+map[bool]string{true: "present", false: "absent"}[d.Present]+":"+map[bool]string{true: "disk", false: "other"}[d.IsHardDisk()])
	}
	want := "scsi0:0=web.vmdk:present:disk scsi0:1=web_1.vmdk:absent:disk sata0:0=/vmfs/volumes/iso/ubuntu.iso:present:other nvme0:0=web_2.vmdk:present:disk ide1:0=legacy.vmdk:present:disk"
	if strings.Join(got, " ") != want {
		t.Errorf("Disks:\n%s\nwant\n%s", strings.Join(got, " "), want)
	}
}

func TestKeySafe(t *testing.T) {
	f, _ := Parse([]byte(sampleVMX))
	if f.Encrypted() {
		t.Fatal("plain VM reported encrypted")
	}
	if kl, err := f.KeySafe(); kl != nil || err != nil {
		t.Fatalf("KeySafe on plain VM: %v %v", kl, err)
	}
	kl := &crypto.KeyLocator{Type: crypto.KeyLocatorTypeList, List: []*crypto.KeyLocator{{
		Type: crypto.KeyLocatorTypePair,
		Pair: &crypto.KeyLocatorPair{
			Locker: &crypto.KeyLocator{Type: crypto.KeyLocatorTypeFQID, Indirect: &crypto.KeyLocatorIndirect{
				Type: crypto.KeyLocatorTypeFQID, FQID: crypto.KeyLocatorFQIDParams{KeyServerID: "kms-1", KeyID: "key-42"},
			}},
			CryptoMAC:  "HMAC-SHA-256",
			LockedData: bytes.Repeat([]byte{7}, 64),
		},
	}}}
	if err := f.SetKeySafe(kl); err != nil {
		t.Fatal(err)
	}
	if err := f.SetEncryptionData("QUJD"); err != nil {
		t.Fatal(err)
	}
	g, _ := Parse(f.Bytes())
	if !g.Encrypted() {
		t.Fatal("keySafe lost")
	}
	back, err := g.KeySafe()
	if err != nil {
		t.Fatal(err)
	}
	fq := back.List[0].Pair.Locker.Indirect.FQID
	if fq.KeyServerID != "kms-1" || fq.KeyID != "key-42" || !bytes.Equal(back.List[0].Pair.LockedData, bytes.Repeat([]byte{7}, 64)) {
		t.Errorf("round trip: %+v", fq)
	}
	if v, _ := g.EncryptionData(); v != "QUJD" {
		t.Errorf("encryption.data %q", v)
	}
	g.Set(KeyKeySafe, "vmware:key/list/(pair/(fqid")
	if _, err := g.KeySafe(); err == nil {
		t.Error("malformed key safe accepted")
	}
	g.SetKeySafe(nil)
	g.SetEncryptionData("")
	if g.Encrypted() || g.Has(KeyEncryptionData) {
		t.Error("removal failed")
	}
}

const sampleVMSD = `.encoding = "UTF-8"
snapshot.lastUID = "2"
snapshot.current = "2"
snapshot0.uid = "1"
snapshot0.filename = "web-Snapshot1.vmsn"
snapshot0.displayName = "before upgrade"
snapshot0.numDisks = "2"
snapshot0.disk0.fileName = "web.vmdk"
snapshot0.disk0.node = "scsi0:0"
snapshot0.disk1.fileName = "web_1.vmdk"
snapshot0.disk1.node = "scsi0:1"
snapshot1.uid = "2"
snapshot1.parent = "1"
snapshot1.filename = "web-Snapshot2.vmsn"
snapshot1.displayName = "after |22upgrade|22"
snapshot1.numDisks = "1"
snapshot1.disk0.fileName = "web-000001.vmdk"
snapshot1.disk0.node = "scsi0:0"
snapshot.numSnapshots = "2"
`

func TestSnapshots(t *testing.T) {
	f, err := Parse([]byte(sampleVMSD))
	if err != nil {
		t.Fatal(err)
	}
	s := f.Snapshots()
	if len(s) != 2 {
		t.Fatalf("%d snapshots", len(s))
	}
	if s[0].FileName != "web-Snapshot1.vmsn" || s[0].UID != "1" || len(s[0].Disks) != 2 || s[0].Disks[1] != (SnapshotDisk{Node: "scsi0:1", FileName: "web_1.vmdk"}) {
		t.Errorf("snapshot0 %+v", s[0])
	}
	if s[1].DisplayName != `after "upgrade"` || s[1].Parent != "1" || s[1].Disks[0].FileName != "web-000001.vmdk" {
		t.Errorf("snapshot1 %+v", s[1])
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(sampleVMX))
	f.Add([]byte(sampleVMSD))
	f.Add([]byte("a = \"|7C|22|0a\"\r\nb=c # d\n#e\n\"x\" = y\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		file, err := Parse(b)
		if err != nil {
			return
		}
		if !bytes.Equal(file.Bytes(), b) {
			t.Fatalf("round trip differs for %q", b)
		}
		file.Disks()
		file.Snapshots()
		file.KeySafe()
		for _, k := range file.Keys() {
			v, ok := file.Get(k)
			if !ok {
				t.Fatalf("key %q listed but not found", k)
			}
			// Setting a value back through Escape preserves it.
			if err := file.Set(k, v); err != nil {
				continue // keys that Parse accepts but Set refuses (e.g. with NUL)
			}
			if got, _ := file.Get(k); got != v {
				t.Fatalf("Set/Get(%q) = %q, want %q", k, got, v)
			}
		}
		const val = "v \"|\n\x00é"
		if err := file.Set("fuzz.key", val); err != nil {
			t.Fatal(err)
		}
		g, _ := Parse(file.Bytes())
		if got, _ := g.Get("fuzz.key"); got != val {
			t.Fatalf("appended key reads %q\n%q", got, file.Bytes())
		}
	})
}

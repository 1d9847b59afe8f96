package vmdk

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmware/govmomi/crypto"
)

// handMade descriptors exercise what qemu never writes: comments in odd
// places, unknown keys and lines, CRLF, no final newline, VMFS and ZERO.
var handMade = map[string]string{
	"crlf": "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=7a1e4b2c\r\nparentCID=ffffffff\r\nisNativeSnapshot=\"no\"\r\ncreateType=\"vmfs\"\r\n\r\n" +
		"# Extent description\r\nRW 41943040 VMFS \"vm-flat.vmdk\"\r\n\r\n# The Disk Data Base \r\n#DDB\r\n\r\nddb.adapterType = \"lsilogic\"\r\nddb.uuid = \"60 00 C2 9b 15 c4 f6 6a-a4 6e 6b 4e 8b 9a 7a 4f\"\r\n",
	"no-final-newline": "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\nRW 4192256 FLAT \"a f001.vmdk\" 0\nRW 2048 ZERO\n# trailing comment",
	"unknown-lines": "   # indented comment\nversion = 1\nsome garbage line without equals\n\tCID=00000001\nparentCID=ffffffff\ncreateType=\"custom\"\nfutureKey=value with spaces  \n" +
		"RDONLY 100 SPARSE \"base.vmdk\"\nNOACCESS 8 FLAT \"x.vmdk\" 16\nddb.longContentID = \"a1b2\"\nddb.comment = \"\"\n\n\n",
	"empty":      "",
	"only-blank": "\n\n  \n",
}

func TestDescriptorRoundTripHandMade(t *testing.T) {
	for name, text := range handMade {
		t.Run(name, func(t *testing.T) {
			d, err := ParseDescriptor([]byte(text))
			if err != nil {
				t.Fatal(err)
			}
			if got := string(d.Bytes()); got != text {
				t.Fatalf("round trip differs:\n%q\n%q", got, text)
			}
		})
	}
}

func TestDescriptorFields(t *testing.T) {
	d, err := ParseDescriptor([]byte(handMade["unknown-lines"]))
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := d.Get("version"); v != "1" {
		t.Errorf("version %q", v)
	}
	if v, _ := d.Get("FUTUREKEY"); v != "value with spaces" {
		t.Errorf("futureKey %q", v)
	}
	if cid, err := d.CID(); err != nil || cid != 1 {
		t.Errorf("CID %x %v", cid, err)
	}
	if p, err := d.ParentCID(); err != nil || p != 0xffffffff {
		t.Errorf("parentCID %x %v", p, err)
	}
	if v, ok := d.Get("ddb.comment"); !ok || v != "" {
		t.Errorf("ddb.comment %q %v", v, ok)
	}
	want := []Extent{
		{Access: "RDONLY", Sectors: 100, Type: "SPARSE", Filename: "base.vmdk"},
		{Access: "NOACCESS", Sectors: 8, Type: "FLAT", Filename: "x.vmdk", Offset: 16, HasOffset: true},
	}
	got := d.Extents()
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("extents %+v", got)
	}
	d2, _ := ParseDescriptor([]byte(handMade["no-final-newline"]))
	x := d2.Extents()
	if len(x) != 2 || x[0].Filename != "a f001.vmdk" || x[1].Type != "ZERO" || x[1].Filename != "" {
		t.Errorf("extents %+v", x)
	}
}

func TestDescriptorSet(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		ops      func(d *Descriptor) error
		want     string
	}{
		{
			name: "existing keeps position and quoting",
			in:   "# Disk DescriptorFile\nversion=1\nCID=aaaaaaaa\ncreateType=\"monolithicSparse\"\nRW 8 SPARSE \"x.vmdk\"\nddb.a = \"1\"\n",
			ops: func(d *Descriptor) error {
				if err := d.SetCID(0x1234); err != nil {
					return err
				}
				if err := d.Set("createType", "vmfs"); err != nil {
					return err
				}
				return d.Set("ddb.A", "2")
			},
			want: "# Disk DescriptorFile\nversion=1\nCID=00001234\ncreateType=\"vmfs\"\nRW 8 SPARSE \"x.vmdk\"\nddb.a = \"2\"\n",
		},
		{
			name: "new header key goes after the last header line",
			in:   "# Disk DescriptorFile\r\nversion=1\r\ncreateType=\"vmfs\"\r\n\r\n# Extent description\r\nRW 8 VMFS \"x.vmdk\"\r\n",
			ops:  func(d *Descriptor) error { return d.Set("encryptionKeys", "vmware:key/x") },
			want: "# Disk DescriptorFile\r\nversion=1\r\ncreateType=\"vmfs\"\r\nencryptionKeys=\"vmware:key/x\"\r\n\r\n# Extent description\r\nRW 8 VMFS \"x.vmdk\"\r\n",
		},
		{
			name: "new header key without any header",
			in:   "# Disk DescriptorFile\n\n# Extent description\nRW 8 VMFS \"x.vmdk\"\n",
			ops:  func(d *Descriptor) error { return d.Set("version", "1") },
			want: "# Disk DescriptorFile\nversion=1\n\n# Extent description\nRW 8 VMFS \"x.vmdk\"\n",
		},
		{
			name: "new ddb key after last ddb, unterminated end",
			in:   "version=1\nddb.a = \"1\"",
			ops:  func(d *Descriptor) error { return d.Set("ddb.b", "2") },
			want: "version=1\nddb.a = \"1\"\nddb.b = \"2\"",
		},
		{
			name: "delete",
			in:   "version=1\nencryptionKeys=\"x\"\nCID=1\nencryptionkeys=\"y\"",
			ops: func(d *Descriptor) error {
				if !d.Delete("encryptionKeys") || d.Delete("nothing") {
					t := "delete result wrong"
					return &strErr{t}
				}
				return nil
			},
			want: "version=1\nCID=1",
		},
		{
			name: "set extent",
			in:   "createType=\"monolithicFlat\"\nRW 8 FLAT \"old.vmdk\" 0\n",
			ops: func(d *Descriptor) error {
				return d.SetExtent(0, Extent{Access: "RW", Sectors: 16, Type: "FLAT", Filename: "new name.vmdk", HasOffset: true})
			},
			want: "createType=\"monolithicFlat\"\nRW 16 FLAT \"new name.vmdk\" 0\n",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := ParseDescriptor([]byte(tc.in))
			if err != nil {
				t.Fatal(err)
			}
			if err := tc.ops(d); err != nil {
				t.Fatal(err)
			}
			if got := d.String(); got != tc.want {
				t.Errorf("got\n%q\nwant\n%q", got, tc.want)
			}
			// What we write parses again to the same bytes.
			d2, err := ParseDescriptor(d.Bytes())
			if err != nil || d2.String() != tc.want {
				t.Errorf("re-parse: %v", err)
			}
		})
	}
}

type strErr struct{ s string }

func (e *strErr) Error() string { return e.s }

func TestDescriptorRejects(t *testing.T) {
	for _, in := range []string{
		"RW 12x FLAT \"a\"\n",
		"RW 8 FLAT a.vmdk\n",
		"RW 8 FLAT \"a.vmdk\n",
		"RW 8 FLAT \"a.vmdk\" -1\n",
		"RW\n",
		"createType=\"monolithic\n",
	} {
		if _, err := ParseDescriptor([]byte(in)); err == nil || !strings.Contains(err.Error(), "line 1") {
			t.Errorf("%q: err = %v", in, err)
		}
	}
	d, _ := ParseDescriptor(nil)
	for _, kv := range [][2]string{{"a b", "x"}, {"k", "a\"b"}, {"k", "a\nb"}, {"", "x"}, {"a=b", "x"}} {
		if err := d.Set(kv[0], kv[1]); err == nil {
			t.Errorf("Set(%q, %q) accepted", kv[0], kv[1])
		}
	}
}

func testKeyLocator() *crypto.KeyLocator {
	return &crypto.KeyLocator{
		Type: crypto.KeyLocatorTypeList,
		List: []*crypto.KeyLocator{{
			Type: crypto.KeyLocatorTypePair,
			Pair: &crypto.KeyLocatorPair{
				Locker: &crypto.KeyLocator{
					Type: crypto.KeyLocatorTypeFQID,
					Indirect: &crypto.KeyLocatorIndirect{
						Type: crypto.KeyLocatorTypeFQID,
						FQID: crypto.KeyLocatorFQIDParams{KeyServerID: "lab-kms", KeyID: "6e1f3c2a-0000-4b5e-9f1a-000000000001"},
					},
				},
				CryptoMAC:  "HMAC-SHA-256",
				LockedData: bytes.Repeat([]byte{0xa5}, 96),
			},
		}},
	}
}

func TestEncryptionKeys(t *testing.T) {
	d, _ := ParseDescriptor([]byte("# Disk DescriptorFile\nversion=1\ncreateType=\"vmfs\"\nRW 8 VMFS \"x-flat.vmdk\"\n"))
	if kl, err := d.EncryptionKeys(); kl != nil || err != nil {
		t.Fatalf("absent keys = %v, %v", kl, err)
	}
	if err := d.SetEncryptionKeys(testKeyLocator()); err != nil {
		t.Fatal(err)
	}
	v, _ := d.Get("encryptionKeys")
	if !strings.HasPrefix(v, "vmware:key/list/(pair/(fqid/") {
		t.Fatalf("encryptionKeys = %q", v)
	}
	lines := strings.Split(d.String(), "\n")
	if lines[3] != `encryptionKeys="`+v+`"` {
		t.Errorf("line 4 = %q", lines[3])
	}
	kl, err := d.EncryptionKeys()
	if err != nil {
		t.Fatal(err)
	}
	pair := kl.List[0].Pair
	if pair.Locker.Indirect.FQID.KeyServerID != "lab-kms" || pair.Locker.Indirect.FQID.KeyID != "6e1f3c2a-0000-4b5e-9f1a-000000000001" ||
		pair.CryptoMAC != "HMAC-SHA-256" || !bytes.Equal(pair.LockedData, bytes.Repeat([]byte{0xa5}, 96)) {
		t.Errorf("round trip lost data: %+v", pair)
	}
	// govmomi's own example key locator parses too.
	d.Set("encryptionKeys", "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/local/ASEAAgEA,HMAC%2dSHA%2d256,kIc7z%2fJowrpz))")
	if _, err := d.EncryptionKeys(); err != nil {
		t.Error(err)
	}
	d.Set("encryptionKeys", "vmware:key/list/(pair/(")
	if _, err := d.EncryptionKeys(); err == nil {
		t.Error("malformed key locator accepted")
	}
	d.SetEncryptionKeys(nil)
	if _, ok := d.Get("encryptionKeys"); ok {
		t.Error("SetEncryptionKeys(nil) kept the line")
	}
}

// TestQemuDescriptorsRoundTrip parses every descriptor qemu writes (plain
// and embedded), checks byte-identical output, and checks that qemu still
// reads a disk whose descriptor gained an encryptionKeys line.
func TestQemuDescriptorsRoundTrip(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	for _, sub := range []string{"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"} {
		t.Run(sub, func(t *testing.T) {
			file := filepath.Join(dir, sub+".vmdk")
			run(t, dir, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sub+",adapter_type=lsilogic", sub+".vmdk", "3G")
			raw := readFile(t, file)
			var text []byte
			if IsSparse(raw) {
				s, err := OpenSparse(bytes.NewReader(raw), int64(len(raw)), file)
				if err != nil {
					t.Fatal(err)
				}
				text, _ = s.EmbeddedDescriptor()
			} else {
				text = raw
			}
			d, err := ParseDescriptor(text)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(d.Bytes(), text) {
				t.Fatal("round trip differs")
			}
			if d.CreateType() != sub {
				t.Errorf("createType %q", d.CreateType())
			}
			if err := d.SetEncryptionKeys(testKeyLocator()); err != nil {
				t.Fatal(err)
			}
			if IsSparse(raw) {
				h, _ := ParseSparseHeader(raw)
				f := &sliceWriter{b: raw}
				if err := WriteEmbeddedDescriptor(f, h, d); err != nil {
					t.Fatal(err)
				}
				writeFile(t, file, f.b)
			} else {
				writeFile(t, file, d.Bytes())
			}
			run(t, dir, "qemu-img", "info", file)
			run(t, dir, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", file, "/dev/null")
			disk := mustOpen(t, file)
			kl, err := disk.Descriptor().EncryptionKeys()
			if err != nil || kl == nil {
				t.Fatalf("keys after reopen: %v", err)
			}
		})
	}
}

type sliceWriter struct{ b []byte }

func (w *sliceWriter) WriteAt(p []byte, off int64) (int, error) {
	return copy(w.b[off:], p), nil
}

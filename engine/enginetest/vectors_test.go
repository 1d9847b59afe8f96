package enginetest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/internal/testkit"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/view"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/engine/vmops"
	"github.com/vmcryptd/vmcryptd/formats/vmx"
)

// The FORMAT.md vectors: inputs are fixed in the document, outputs are
// recomputed here and must match. `go test ./engine -run TestFormatVectors
// -update-vectors` rewrites the outputs (and docs/vectors/container-v1.bin)
// after an intentional format change; review the diff.
var updateVectors = flag.Bool("update-vectors", false, "rewrite FORMAT.md vector outputs")

const formatDoc = "../../docs/FORMAT.md"

type vector map[string]string

// readVectors returns the ```vector NAME blocks of FORMAT.md.
func readVectors(t *testing.T) (map[string]vector, []string) {
	t.Helper()
	raw, err := os.ReadFile(formatDoc)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(raw), "\n")
	out := map[string]vector{}
	var cur vector
	for _, l := range lines {
		switch {
		case strings.HasPrefix(l, "```vector "):
			cur = vector{}
			out[strings.TrimPrefix(l, "```vector ")] = cur
		case cur != nil && l == "```":
			cur = nil
		case cur != nil:
			k, v, ok := strings.Cut(l, ": ")
			if !ok {
				t.Fatalf("FORMAT.md: bad vector line %q", l)
			}
			cur[k] = v
		}
	}
	return out, lines
}

func unhex(t *testing.T, v vector, k string) []byte {
	t.Helper()
	b, err := hex.DecodeString(v[k])
	if err != nil {
		t.Fatalf("vector field %s: %v", k, err)
	}
	return b
}

// pattern is the plaintext used by the vectors: byte i is i mod 251 (a
// prime, so units differ from each other).
func pattern(n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i % 251)
	}
	return p
}

func TestFormatVectors(t *testing.T) {
	vecs, lines := readVectors(t)
	got := map[string]vector{}
	for _, name := range []string{"wrap", "kdf", "xts", "container", "vmxdata", "keysafe_area"} {
		if vecs[name] == nil {
			t.Fatalf("FORMAT.md has no %q vector", name)
		}
		got[name] = vector{}
	}

	// wrap
	w := vecs["wrap"]
	kek, err := keys.NewKEK(keys.KeyRef{Provider: w["provider"], KeyID: w["key_id"]}, unhex(t, w, "kek"))
	if err != nil {
		t.Fatal(err)
	}
	defer kek.Destroy()
	dek, err := keys.DEKFromBytes(unhex(t, w, "dek"))
	if err != nil {
		t.Fatal(err)
	}
	defer dek.Destroy()
	bind := keys.Binding{Purpose: keys.Purpose(w["purpose"]), OwnerID: w["owner"]}
	locked, err := keys.WrapDEKWithSalt(kek, dek, bind, unhex(t, w, "salt"))
	if err != nil {
		t.Fatal(err)
	}
	ks, err := keys.EncodeKeySafe([]keys.KeySafeEntry{{KEK: kek.Ref, Locked: locked}})
	if err != nil {
		t.Fatal(err)
	}
	got["wrap"]["ad"] = hex.EncodeToString(keys.WrapAD(kek.Ref, bind))
	got["wrap"]["locked"] = hex.EncodeToString(locked)
	got["wrap"]["keysafe"] = ks

	// kdf
	k := vecs["kdf"]
	kdek, err := keys.DEKFromBytes(unhex(t, k, "dek"))
	if err != nil {
		t.Fatal(err)
	}
	defer kdek.Destroy()
	ck, err := container.DeriveContainerKeys(kdek)
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Destroy()
	var fid [16]byte
	copy(fid[:], unhex(t, k, "file_id"))
	xk, err := ck.FileXTSKey(fid)
	if err != nil {
		t.Fatal(err)
	}
	got["kdf"]["prk"] = hex.EncodeToString(ck.Prk.Bytes())
	got["kdf"]["mac_key"] = hex.EncodeToString(ck.MacKey.Bytes())
	got["kdf"]["fingerprint"] = hex.EncodeToString(ck.Fingerprint[:])
	got["kdf"]["xts_key"] = hex.EncodeToString(xk)

	// xts: one unit through the engine's cipher (its default impl).
	x := vecs["xts"]
	unitSize, _ := strconv.Atoi(x["unit_size"])
	unitNo, _ := strconv.ParseUint(x["unit"], 10, 64)
	impl, err := container.ChooseImpl()
	if err != nil {
		t.Fatal(err)
	}
	c, err := container.NewXTS(unhex(t, x, "xts_key"), unitSize, impl)
	if err != nil {
		t.Fatal(err)
	}
	pt := pattern(unitSize)
	ct := make([]byte, unitSize)
	if err := c.Encrypt(ct, pt, unitNo); err != nil {
		t.Fatal(err)
	}
	c.Close()
	got["xts"]["plaintext"] = hex.EncodeToString(pt)
	got["xts"]["ciphertext"] = hex.EncodeToString(ct)

	// container file
	cv := vecs["container"]
	cdek, err := keys.DEKFromBytes(unhex(t, cv, "dek"))
	if err != nil {
		t.Fatal(err)
	}
	defer cdek.Destroy()
	size, _ := strconv.Atoi(cv["size"])
	filePath := filepath.Join(filepath.Dir(formatDoc), cv["file"])
	var cfid [16]byte
	copy(cfid[:], unhex(t, cv, "file_id"))
	tmp := filepath.Join(t.TempDir(), "container.bin")
	cc, err := container.CreateContainer(tmp, cdek, container.CreateOptions{Kind: container.KindNVRAM, Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: cv["owner"]}, FileID: &cfid})
	if err != nil {
		t.Fatal(err)
	}
	plain := pattern(size)
	if _, err := cc.WriteAt(plain, 0); err != nil {
		t.Fatal(err)
	}
	if err := cc.Close(); err != nil {
		t.Fatal(err)
	}
	made, _ := os.ReadFile(tmp)
	sum := sha256.Sum256(plain)
	fileSum := sha256.Sum256(made)
	got["container"]["plaintext_sha256"] = hex.EncodeToString(sum[:])
	got["container"]["file_sha256"] = hex.EncodeToString(fileSum[:])

	// encryption.data
	vd := vecs["vmxdata"]
	vdek, err := keys.DEKFromBytes(unhex(t, vd, "dek"))
	if err != nil {
		t.Fatal(err)
	}
	defer vdek.Destroy()
	rest, moved := vmx.ExtractSensitive(unhex(t, vd, "vmx"))
	var p []byte
	for _, m := range moved {
		p = append(p, byte(m.Index), byte(m.Index>>8), byte(m.Index>>16), byte(m.Index>>24))
		p = append(p, byte(len(m.Raw)), byte(len(m.Raw)>>8), byte(len(m.Raw)>>16), byte(len(m.Raw)>>24))
		p = append(p, m.Raw...)
	}
	sealed, err := container.SealVMXDataNonce(vdek, vd["vm_id"], moved, unhex(t, vd, "nonce"))
	if err != nil {
		t.Fatal(err)
	}
	got["vmxdata"]["vmx_rest"] = hex.EncodeToString(rest)
	got["vmxdata"]["plaintext"] = hex.EncodeToString(p)
	got["vmxdata"]["data"] = sealed
	backLines, err := container.OpenVMXData(vdek, vd["vm_id"], sealed)
	if err != nil || !bytes.Equal(vmx.RestoreSensitive(rest, backLines), unhex(t, vd, "vmx")) {
		t.Errorf("encryption.data vector does not restore the vmx: %v", err)
	}

	// embedded keySafe copy
	ka := vecs["keysafe_area"]
	seq, _ := strconv.ParseUint(ka["seq"], 10, 64)
	cp, err := container.MarshalKSCopy(ka["keysafe"], seq)
	if err != nil {
		t.Fatal(err)
	}
	cpSum := sha256.Sum256(cp)
	got["keysafe_area"]["copy_head"] = hex.EncodeToString(cp[:32])
	got["keysafe_area"]["hash"] = hex.EncodeToString(cp[container.KsHashOff:])
	if h := sha256.Sum256(cp[:container.KsHashOff]); !bytes.Equal(h[:], cp[container.KsHashOff:]) {
		t.Error("keySafe copy: bytes 1504..1535 are not the SHA-256 of bytes 0..1503")
	}
	if s, sq, ok := container.ParseKSCopy(cp); !ok || s != ka["keysafe"] || sq != seq {
		t.Errorf("keySafe copy does not parse back: %q %d %v", s, sq, ok)
	}
	got["keysafe_area"]["copy_sha256"] = hex.EncodeToString(cpSum[:])

	if *updateVectors {
		writeVectors(t, lines, got)
		if err := os.WriteFile(filePath, made, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	for name, fields := range got {
		for f, v := range fields {
			if vecs[name][f] != v {
				t.Errorf("FORMAT.md vector %s.%s:\n have %s\n want %s", name, f, vecs[name][f], v)
			}
		}
	}
	// The committed example file must be byte-identical to what the code makes.
	committed, err := os.ReadFile(filePath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(committed, made) {
		t.Errorf("%s differs from a freshly made container", filePath)
	}
	// And it opens and decrypts to the pattern.
	oc, err := container.OpenContainer(filePath, cdek, true, "")
	if err != nil {
		t.Fatal(err)
	}
	defer oc.Close()
	back := make([]byte, size)
	if _, err := oc.ReadAt(back, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, plain) {
		t.Error("example container does not decrypt to the pattern")
	}
}

func writeVectors(t *testing.T, lines []string, got map[string]vector) {
	var out bytes.Buffer
	bw := bufio.NewWriter(&out)
	var cur string
	for i, l := range lines {
		switch {
		case strings.HasPrefix(l, "```vector "):
			cur = strings.TrimPrefix(l, "```vector ")
		case cur != "" && l == "```":
			cur = ""
		case cur != "":
			k, _, _ := strings.Cut(l, ": ")
			if v, ok := got[cur][k]; ok {
				l = k + ": " + v
			}
		}
		bw.WriteString(l)
		if i < len(lines)-1 {
			bw.WriteString("\n")
		}
	}
	bw.Flush()
	if err := os.WriteFile(formatDoc, out.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	fmt.Println("rewrote", formatDoc)
}

// applyEdit runs the edit steps of a FORMAT.md 3.6 negative vector on a
// copy of file. macKey is the container's header MAC key (for remac).
func applyEdit(t *testing.T, file []byte, edit string, macKey []byte) []byte {
	t.Helper()
	b := bytes.Clone(file)
	num := func(s string) int {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("edit %q: %v", edit, err)
		}
		return n
	}
	for _, step := range strings.Split(edit, "; ") {
		f := strings.Fields(step)
		switch {
		case len(f) == 2 && f[0] == "xor":
			b[num(f[1])] ^= 0x01
		case len(f) == 3 && f[0] == "set":
			v, err := hex.DecodeString(f[2])
			if err != nil {
				t.Fatalf("edit %q: %v", edit, err)
			}
			copy(b[num(f[1]):], v)
		case len(f) == 4 && f[0] == "copy":
			n := num(f[3])
			copy(b[num(f[2]):num(f[2])+n], b[num(f[1]):num(f[1])+n])
		case len(f) == 3 && f[0] == "add64":
			o := num(f[1])
			binary.LittleEndian.PutUint64(b[o:], binary.LittleEndian.Uint64(b[o:])+uint64(int64(num(f[2]))))
		case len(f) == 2 && f[0] == "remac":
			s := b[num(f[1])*container.SlotSize:][:container.SlotSize]
			m := hmac.New(sha256.New, macKey)
			m.Write(s[:container.SlotMACOffset])
			copy(s[container.SlotMACOffset:], m.Sum(nil))
		default:
			t.Fatalf("FORMAT.md negative vector: unknown edit step %q", step)
		}
	}
	return b
}

// negVM is the VM of the 3.6 container vectors: a datastore with VM "vm"
// whose vmx gives the container vector's DEK (wrapped under the wrap
// vector's KEK) and VM id; file is installed as vm/name.
func negVM(t *testing.T, vecs map[string]vector, name string, file []byte) (*vmops.VMOps, string, *view.Datastore) {
	t.Helper()
	w, cv := vecs["wrap"], vecs["container"]
	ref := keys.KeyRef{Provider: w["provider"], KeyID: w["key_id"]}
	kr := keys.NewKeyring()
	t.Cleanup(kr.Close)
	kr.SetProvider(ref.Provider, &testkit.MemKeyServer{Keys: map[string][]byte{ref.KeyID: unhex(t, w, "kek")}})
	kek, err := kr.Get(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	dek, err := keys.DEKFromBytes(unhex(t, cv, "dek"))
	if err != nil {
		t.Fatal(err)
	}
	defer dek.Destroy()
	locked, err := keys.WrapDEK(kek, dek, keys.Binding{Purpose: keys.PurposeVM, OwnerID: cv["owner"]})
	if err != nil {
		t.Fatal(err)
	}
	ks, err := keys.EncodeKeySafe([]keys.KeySafeEntry{{KEK: ref, Locked: locked}})
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	dir := filepath.Join(root, "vm")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	vmxText := fmt.Sprintf(".encoding = \"UTF-8\"\nconfig.version = \"8\"\ndisplayName = \"vm\"\nnvram = \"vm.nvram\"\n%s = \"%s\"\n%s = \"%s\"\n%s = \"%s\"\n",
		vm.VMXVMID, cv["owner"], vm.VMXKeySafe, ks, vm.VMXPolicy, vm.PolicyEncrypt)
	if err := os.WriteFile(filepath.Join(dir, "vm.vmx"), []byte(vmxText), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), file, 0o600); err != nil {
		t.Fatal(err)
	}
	ds := view.NewDatastore(root, kr, view.DatastoreOptions{})
	t.Cleanup(ds.Close)
	return &vmops.VMOps{Keys: kr}, dir, ds
}

// TestFormatNegativeVectors checks every FORMAT.md 3.6 vector through the
// engine's own way in: the datastore resolves the file from the VM's
// text files and opens it as a view would, and VM operations convert it.
func TestFormatNegativeVectors(t *testing.T) {
	vecs, _ := readVectors(t)
	var names []string
	for name := range vecs {
		if strings.HasPrefix(name, "neg_") {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	for _, want := range []string{"neg_slot_tampered", "neg_both_tampered", "neg_kind_swap", "neg_wrong_owner"} {
		if vecs[want] == nil {
			t.Fatalf("FORMAT.md has no %q vector", want)
		}
	}
	cv := vecs["container"]
	for _, name := range names {
		v := vecs[name]
		t.Run(name, func(t *testing.T) {
			if v["from"] == "wrap" {
				checkNegativeUnwrap(t, vecs["wrap"], v)
				return
			}
			if v["file"] != cv["file"] {
				t.Fatalf("vector starts from %q, want the container vector's file", v["file"])
			}
			base, err := os.ReadFile(filepath.Join(filepath.Dir(formatDoc), v["file"]))
			if err != nil {
				t.Fatal(err)
			}
			dek, err := keys.DEKFromBytes(unhex(t, cv, "dek"))
			if err != nil {
				t.Fatal(err)
			}
			defer dek.Destroy()
			ck, err := container.DeriveContainerKeys(dek)
			if err != nil {
				t.Fatal(err)
			}
			edited := applyEdit(t, base, v["edit"], ck.MacKey.Bytes())
			ck.Destroy()
			ops, dir, ds := negVM(t, vecs, v["name"], edited)
			rel := "vm/" + v["name"]
			path := filepath.Join(dir, v["name"])
			before := snapshotDir(t, dir)
			unchanged := func(what string) {
				t.Helper()
				after := snapshotDir(t, dir)
				for f, b := range before {
					if a, ok := after[f]; !ok || !bytes.Equal(a, b) {
						t.Errorf("%s changed or removed %s", what, f)
					}
				}
				for f := range after {
					if _, ok := before[f]; !ok {
						t.Errorf("%s left a new file %s", what, f)
					}
				}
			}
			switch v["outcome"] {
			case "ok", "interrupted", "degraded":
				c, err := ds.Open(rel, true)
				if err != nil {
					t.Fatalf("read-only open: %v", err)
				}
				h := c.Header()
				back := make([]byte, c.Size())
				_, rerr := c.ReadAt(back, 0)
				c.Close()
				sum := sha256.Sum256(back)
				if rerr != nil || strconv.FormatInt(h.Size, 10) != v["size"] || hex.EncodeToString(sum[:]) != v["plaintext_sha256"] {
					t.Fatalf("read-only open serves %d bytes (sha256 %x, err %v) from slot %d, want %s bytes with sha256 %s", h.Size, sum, rerr, h.Slot, v["size"], v["plaintext_sha256"])
				}
				if slot := strconv.Itoa(h.Slot); v["slot"] != "" && slot != v["slot"] {
					t.Errorf("served from slot %s, want slot %s", slot, v["slot"])
				}
				unchanged("a read-only open")
				if v["outcome"] == "degraded" {
					// A writer and a conversion must both refuse, naming
					// the file, and change nothing.
					if c, err := ds.Open(rel, false); err == nil {
						c.Close()
						t.Error("a writable open of a degraded container succeeded")
					} else if !strings.Contains(err.Error(), "degraded") || !strings.Contains(err.Error(), path) {
						t.Errorf("writable open: %v, want a degraded-container error naming %s", err, path)
					}
					unchanged("a refused writable open")
					if err := ops.Decrypt(context.Background(), dir); err == nil || !strings.Contains(err.Error(), v["name"]) {
						t.Errorf("vm decrypt of a VM with a degraded container: %v, want a refusal naming %s", err, v["name"])
					}
					unchanged("a refused decrypt")
					return
				}
				c, err = ds.Open(rel, false)
				if err != nil {
					t.Fatalf("writable open: %v", err)
				}
				c.Close()
				if v["outcome"] == "interrupted" {
					// The first writable open mirrors the newer slot.
					b, _ := os.ReadFile(path)
					s0, s1 := bytes.Clone(b[:container.SlotMACOffset]), bytes.Clone(b[container.SlotSize:container.SlotSize+container.SlotMACOffset])
					s0[10], s1[10] = 0, 0
					if !bytes.Equal(s0, s1) {
						t.Error("after a writable open the two header slots still differ")
					}
					if h, err := container.PeekHeader(b); err != nil || strconv.FormatInt(h.Size, 10) != v["size"] {
						t.Errorf("after a writable open: %v, %+v", err, h)
					}
				}
			case "tampered":
				for _, ro := range []bool{true, false} {
					if c, err := ds.Open(rel, ro); err == nil {
						c.Close()
						t.Fatalf("open (read-only %v) of a tampered container succeeded", ro)
					} else if !errors.Is(err, container.ErrTampered) || !strings.Contains(err.Error(), path) {
						t.Errorf("open (read-only %v): %v, want ErrTampered naming %s", ro, err, path)
					}
				}
				unchanged("a refused open")
			case "kind-mismatch":
				if c, err := ds.Open(rel, true); err == nil {
					c.Close()
					t.Fatal("a container of another kind was served under this name")
				} else if !errors.Is(err, container.ErrKindMismatch) || !strings.Contains(err.Error(), path) {
					t.Errorf("open: %v, want ErrKindMismatch naming %s", err, path)
				}
				unchanged("a refused open")
			default:
				t.Fatalf("unknown outcome %q", v["outcome"])
			}
		})
	}
}

// checkNegativeUnwrap unwraps the wrap vector's locked data under the
// binding of a 3.6 keySafe vector.
func checkNegativeUnwrap(t *testing.T, w, v vector) {
	if v["outcome"] != "aead-failure" {
		t.Fatalf("unknown outcome %q for a keySafe vector", v["outcome"])
	}
	kek, err := keys.NewKEK(keys.KeyRef{Provider: w["provider"], KeyID: w["key_id"]}, unhex(t, w, "kek"))
	if err != nil {
		t.Fatal(err)
	}
	defer kek.Destroy()
	locked := unhex(t, w, "locked")
	// The vector's own binding opens it: the failure below is the binding's.
	good, err := keys.UnwrapDEK(kek, locked, keys.Binding{Purpose: keys.Purpose(w["purpose"]), OwnerID: w["owner"]})
	if err != nil {
		t.Fatalf("the wrap vector does not unwrap under its own binding: %v", err)
	}
	good.Destroy()
	b := keys.Binding{Purpose: keys.Purpose(v["purpose"]), OwnerID: v["owner"]}
	if b == (keys.Binding{Purpose: keys.Purpose(w["purpose"]), OwnerID: w["owner"]}) {
		t.Fatal("the vector's binding is the wrap vector's own")
	}
	if dek, err := keys.UnwrapDEK(kek, locked, b); err == nil {
		dek.Destroy()
		t.Fatalf("unwrap under %+v succeeded", b)
	} else if !strings.Contains(err.Error(), "authentication failed") {
		t.Errorf("unwrap under %+v: %v, want an authentication failure", b, err)
	}
}

// FORMAT.md 2.2: every byte of a field that is not an ASCII letter or
// digit is escaped as lower-case %xx (there is no safe punctuation), the
// unique id is a raw <VMWARE-NULL>, and the fields decode back exactly.
func TestKeySafeEscaping(t *testing.T) {
	locked := bytes.Repeat([]byte{0xfb}, keys.LockedDataLen) // base64 "+/v7..." exercises + and /
	for _, tc := range []struct {
		ref  keys.KeyRef
		want string // the locker as written
	}{
		{keys.KeyRef{Provider: "lab", KeyID: "6f1c9e52-7a3b"}, "fqid/<VMWARE-NULL>/lab/6f1c9e52%2d7a3b,"},
		{keys.KeyRef{Provider: "a.b_c~d", KeyID: "K 1/2+3=4"}, "fqid/<VMWARE-NULL>/a%2eb%5fc%7ed/K%201%2f2%2b3%3d4,"},
		{keys.KeyRef{Provider: "kms:1", KeyID: "(x),<y>%"}, "fqid/<VMWARE-NULL>/kms%3a1/%28x%29%2c%3cy%3e%25,"},
		{keys.KeyRef{Provider: "é", KeyID: "Z9"}, "fqid/<VMWARE-NULL>/%c3%a9/Z9,"},
	} {
		ks, err := keys.EncodeKeySafe([]keys.KeySafeEntry{{KEK: tc.ref, Locked: locked}})
		if err != nil {
			t.Fatal(err)
		}
		wantPrefix := "vmware:key/list/(pair/(" + tc.want + "VMCRYPTD%2dV1%2dHKDF%2dSHA%2d256%2dAES%2d256%2dGCM,"
		if !strings.HasPrefix(ks, wantPrefix) || !strings.HasSuffix(ks, "))") {
			t.Errorf("%v: %s\nwant prefix %s", tc.ref, ks, wantPrefix)
		}
		if data := strings.TrimSuffix(strings.TrimPrefix(ks, wantPrefix), "))"); strings.ContainsAny(data, "+/=") || !strings.Contains(data, "%2b") || !strings.Contains(data, "%2f") {
			t.Errorf("%v: locked data not escaped as documented: %s", tc.ref, data)
		}
		back, err := keys.DecodeKeySafe(ks)
		if err != nil || len(back) != 1 || back[0].KEK != tc.ref || !bytes.Equal(back[0].Locked, locked) {
			t.Errorf("%v: decodes to %+v, %v", tc.ref, back, err)
		}
	}
}

package engine

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The FORMAT.md vectors: inputs are fixed in the document, outputs are
// recomputed here and must match. `go test ./engine -run TestFormatVectors
// -update-vectors` rewrites the outputs (and docs/vectors/container-v1.bin)
// after an intentional format change; review the diff.
var updateVectors = flag.Bool("update-vectors", false, "rewrite FORMAT.md vector outputs")

const formatDoc = "../docs/FORMAT.md"

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
	kek, err := NewKEK(KeyRef{w["provider"], w["key_id"]}, unhex(t, w, "kek"))
	if err != nil {
		t.Fatal(err)
	}
	defer kek.Destroy()
	dek, err := dekFromBytes(unhex(t, w, "dek"))
	if err != nil {
		t.Fatal(err)
	}
	defer dek.Destroy()
	bind := Binding{Purpose(w["purpose"]), w["owner"]}
	locked, err := wrapDEKWithSalt(kek, dek, bind, unhex(t, w, "salt"))
	if err != nil {
		t.Fatal(err)
	}
	ks, err := EncodeKeySafe([]KeySafeEntry{{KEK: kek.Ref, Locked: locked}})
	if err != nil {
		t.Fatal(err)
	}
	got["wrap"]["ad"] = hex.EncodeToString(wrapAD(kek.Ref, bind))
	got["wrap"]["locked"] = hex.EncodeToString(locked)
	got["wrap"]["keysafe"] = ks

	// kdf
	k := vecs["kdf"]
	kdek, err := dekFromBytes(unhex(t, k, "dek"))
	if err != nil {
		t.Fatal(err)
	}
	defer kdek.Destroy()
	keys, err := deriveContainerKeys(kdek)
	if err != nil {
		t.Fatal(err)
	}
	defer keys.destroy()
	var fid [16]byte
	copy(fid[:], unhex(t, k, "file_id"))
	xk, err := keys.fileXTSKey(fid)
	if err != nil {
		t.Fatal(err)
	}
	got["kdf"]["prk"] = hex.EncodeToString(keys.prk.Bytes())
	got["kdf"]["mac_key"] = hex.EncodeToString(keys.macKey.Bytes())
	got["kdf"]["fingerprint"] = hex.EncodeToString(keys.fingerprint[:])
	got["kdf"]["xts_key"] = hex.EncodeToString(xk)

	// xts: one unit through the engine's cipher (its default impl).
	x := vecs["xts"]
	unitSize, _ := strconv.Atoi(x["unit_size"])
	unitNo, _ := strconv.ParseUint(x["unit"], 10, 64)
	impl, err := ChooseImpl()
	if err != nil {
		t.Fatal(err)
	}
	c, err := newXTS(unhex(t, x, "xts_key"), unitSize, impl)
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
	cdek, err := dekFromBytes(unhex(t, cv, "dek"))
	if err != nil {
		t.Fatal(err)
	}
	defer cdek.Destroy()
	size, _ := strconv.Atoi(cv["size"])
	filePath := filepath.Join(filepath.Dir(formatDoc), cv["file"])
	var cfid [16]byte
	copy(cfid[:], unhex(t, cv, "file_id"))
	tmp := filepath.Join(t.TempDir(), "container.bin")
	cc, err := CreateContainer(tmp, cdek, CreateOptions{Kind: KindNVRAM, Binding: Binding{PurposeVM, cv["owner"]}, fileID: &cfid})
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
	vdek, err := dekFromBytes(unhex(t, vd, "dek"))
	if err != nil {
		t.Fatal(err)
	}
	defer vdek.Destroy()
	rest, moved := extractSensitive(unhex(t, vd, "vmx"))
	var p []byte
	for _, m := range moved {
		p = append(p, byte(m.index), byte(m.index>>8), byte(m.index>>16), byte(m.index>>24))
		p = append(p, byte(len(m.raw)), byte(len(m.raw)>>8), byte(len(m.raw)>>16), byte(len(m.raw)>>24))
		p = append(p, m.raw...)
	}
	sealed, err := sealVMXDataNonce(vdek, vd["vm_id"], moved, unhex(t, vd, "nonce"))
	if err != nil {
		t.Fatal(err)
	}
	got["vmxdata"]["vmx_rest"] = hex.EncodeToString(rest)
	got["vmxdata"]["plaintext"] = hex.EncodeToString(p)
	got["vmxdata"]["data"] = sealed
	backLines, err := openVMXData(vdek, vd["vm_id"], sealed)
	if err != nil || !bytes.Equal(restoreSensitive(rest, backLines), unhex(t, vd, "vmx")) {
		t.Errorf("encryption.data vector does not restore the vmx: %v", err)
	}

	// embedded keySafe copy
	ka := vecs["keysafe_area"]
	seq, _ := strconv.ParseUint(ka["seq"], 10, 64)
	cp, err := marshalKSCopy(ka["keysafe"], seq)
	if err != nil {
		t.Fatal(err)
	}
	cpSum := sha256.Sum256(cp)
	got["keysafe_area"]["copy_head"] = hex.EncodeToString(cp[:32])
	got["keysafe_area"]["hash"] = hex.EncodeToString(cp[ksHashOff:])
	if h := sha256.Sum256(cp[:ksHashOff]); !bytes.Equal(h[:], cp[ksHashOff:]) {
		t.Error("keySafe copy: bytes 1504..1535 are not the SHA-256 of bytes 0..1503")
	}
	if s, sq, ok := parseKSCopy(cp); !ok || s != ka["keysafe"] || sq != seq {
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
	oc, err := OpenContainer(filePath, cdek, true, "")
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

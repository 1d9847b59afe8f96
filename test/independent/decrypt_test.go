// Package independent decrypts vmcryptd files using only docs/FORMAT.md:
// it shares no code with engine/ (stdlib and golang.org/x/crypto/xts
// only), so a format change the document does not describe fails here.
package independent

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/crypto/xts"
)

const doc = "../../docs/FORMAT.md"

func vectors(t *testing.T) map[string]map[string]string {
	raw, err := os.ReadFile(doc)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string]string{}
	var cur map[string]string
	for _, l := range strings.Split(string(raw), "\n") {
		if name, ok := strings.CutPrefix(l, "```vector "); ok {
			cur = map[string]string{}
			out[name] = cur
			continue
		}
		if l == "```" {
			cur = nil
			continue
		}
		if cur != nil {
			k, v, _ := strings.Cut(l, ": ")
			cur[k] = v
		}
	}
	return out
}

func hx(t *testing.T, s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("hex %q: %v", s, err)
	}
	return b
}

func field(s string) []byte { // FORMAT.md 2.1: u16 BE length || bytes
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(s))), s...)
}

// Section 2: unwrap the DEK from the keySafe string.
func TestUnwrapFromKeySafe(t *testing.T) {
	v := vectors(t)["wrap"]
	ks := v["keysafe"]
	// pair/(fqid/<unique>/<provider>/<keyid>,<mac>,<base64>)
	inner := strings.TrimSuffix(strings.TrimPrefix(ks, "vmware:key/list/(pair/("), "))")
	parts := strings.Split(inner, ",")
	if len(parts) != 3 {
		t.Fatalf("keysafe has %d comma fields", len(parts))
	}
	loc := strings.Split(parts[0], "/")
	unesc := func(s string) string {
		u, err := url.PathUnescape(s)
		if err != nil {
			t.Fatal(err)
		}
		return u
	}
	provider, keyID, mac := unesc(loc[2]), unesc(loc[3]), unesc(parts[1])
	if provider != v["provider"] || keyID != v["key_id"] || mac != "VMCRYPTD-V1-HKDF-SHA-256-AES-256-GCM" {
		t.Fatalf("locker %q %q %q", provider, keyID, mac)
	}
	locked, err := base64.StdEncoding.DecodeString(unesc(parts[2]))
	if err != nil {
		t.Fatal(err)
	}
	if len(locked) != 113 || locked[0] != 1 {
		t.Fatalf("locked data: %d bytes, version %d", len(locked), locked[0])
	}
	wk, err := hkdf.Key(sha256.New, hx(t, v["kek"]), locked[1:33], "vmcryptd v1 dek-wrap", 32)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := aes.NewCipher(wk)
	gcm, _ := cipher.NewGCM(block)
	ad := []byte("vmcryptd v1 wrapped-dek")
	for _, f := range []string{v["purpose"], v["owner"], provider, keyID} {
		ad = append(ad, field(f)...)
	}
	if !bytes.Equal(ad, hx(t, v["ad"])) {
		t.Fatal("associated data differs from the vector")
	}
	dek, err := gcm.Open(nil, make([]byte, 12), locked[33:], ad)
	if err != nil {
		t.Fatalf("unwrap: %v", err)
	}
	if !bytes.Equal(dek, hx(t, v["dek"])) {
		t.Fatal("unwrapped DEK differs")
	}
}

type derived struct{ prk, mac, fp []byte }

func derive(t *testing.T, dek []byte) derived {
	prk, err := hkdf.Extract(sha256.New, dek, []byte("vmcryptd v1 container"))
	if err != nil {
		t.Fatal(err)
	}
	mac, _ := hkdf.Expand(sha256.New, prk, "header-mac", 32)
	fp, _ := hkdf.Expand(sha256.New, prk, "fingerprint", 16)
	return derived{prk, mac, fp}
}

func xtsKey(t *testing.T, prk, fileID []byte) []byte {
	k, err := hkdf.Expand(sha256.New, prk, "xts"+string(fileID), 64)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Section 3.2.
func TestKDF(t *testing.T) {
	v := vectors(t)["kdf"]
	d := derive(t, hx(t, v["dek"]))
	for name, got := range map[string][]byte{"prk": d.prk, "mac_key": d.mac, "fingerprint": d.fp,
		"xts_key": xtsKey(t, d.prk, hx(t, v["file_id"]))} {
		if !bytes.Equal(got, hx(t, v[name])) {
			t.Errorf("%s differs", name)
		}
	}
}

// Section 3.3 with an independent XTS implementation.
func TestXTSUnit(t *testing.T) {
	v := vectors(t)["xts"]
	c, err := xts.NewCipher(aes.NewCipher, hx(t, v["xts_key"]))
	if err != nil {
		t.Fatal(err)
	}
	unit, _ := strconv.ParseUint(v["unit"], 10, 64)
	pt := hx(t, v["plaintext"])
	ct := make([]byte, len(pt))
	c.Encrypt(ct, pt, unit)
	if !bytes.Equal(ct, hx(t, v["ciphertext"])) {
		t.Fatal("ciphertext differs from golang.org/x/crypto/xts")
	}
}

// header is what section 3.1's reader concluded about a file's two slots.
type header struct {
	slot  []byte // the slot to use (512 bytes)
	index int
	state string // "ok" (case a), "interrupted" (b), "degraded" (c)
}

func le64(b []byte) uint64 { return binary.LittleEndian.Uint64(b) }

// slotValid is section 3.1's "verifying a slot": it parses (every byte
// rule of the list), carries the DEK's fingerprint, and its MAC matches.
func slotValid(s []byte, index int, d derived) bool {
	if len(s) != 512 {
		return false
	}
	n := int(s[73])
	unit := binary.LittleEndian.Uint32(s[32:])
	parses := string(s[:8]) == "VMCRYPTD" && s[8] == 1 && s[9] == 0 && int(s[10]) == index &&
		s[11] >= 1 && s[11] <= 8 && bytes.Equal(s[12:16], make([]byte, 4)) && le64(s[24:]) <= 1<<62 &&
		(unit == 512 || unit == 1024 || unit == 2048 || unit == 4096) && binary.LittleEndian.Uint32(s[36:]) == 4096 &&
		s[72] >= 1 && s[72] <= 3 && n >= 1 && n <= 64 && bytes.Equal(s[74+n:480], make([]byte, 480-74-n))
	if !parses || !bytes.Equal(s[56:72], d.fp) {
		return false
	}
	m := hmac.New(sha256.New, d.mac)
	m.Write(s[:480])
	return hmac.Equal(m.Sum(nil), s[480:512])
}

// readHeader is section 3.1's reader: cases (a) to (d).
func readHeader(file []byte, d derived) (header, error) {
	if len(file) < 1024 {
		return header{}, errors.New("file shorter than two header slots")
	}
	s := [2][]byte{file[:512], file[512:1024]}
	v := [2]bool{slotValid(s[0], 0, d), slotValid(s[1], 1, d)}
	switch {
	case v[0] && v[1]:
		// every byte of 0..479 but the slot index; with different
		// sequence numbers, also but the sequence number and size
		fields := func(b []byte, withSeq bool) []byte {
			out := append(append([]byte(nil), b[:10]...), b[11:16]...)
			if withSeq {
				out = append(out, b[16:32]...)
			}
			return append(out, b[32:480]...)
		}
		q0, q1 := le64(s[0][16:]), le64(s[1][16:])
		if q0 == q1 {
			if !bytes.Equal(fields(s[0], true), fields(s[1], true)) {
				return header{}, errors.New("tampered: both slots carry one sequence number but differ")
			}
			return header{s[0], 0, "ok"}, nil
		}
		if !bytes.Equal(fields(s[0], false), fields(s[1], false)) {
			return header{}, errors.New("tampered: the slots describe different files")
		}
		if q1 > q0 {
			return header{s[1], 1, "interrupted"}, nil
		}
		return header{s[0], 0, "interrupted"}, nil
	case v[0]:
		return header{s[0], 0, "degraded"}, nil
	case v[1]:
		return header{s[1], 1, "degraded"}, nil
	}
	return header{}, errors.New("no header slot verifies: wrong key or tampered")
}

// decryptPayload is section 3.3: the plaintext of the logical size.
func decryptPayload(t *testing.T, file []byte, h header, d derived) []byte {
	size := int(le64(h.slot[24:]))
	unit := int(binary.LittleEndian.Uint32(h.slot[32:]))
	c, err := xts.NewCipher(aes.NewCipher, xtsKey(t, d.prk, h.slot[40:56]))
	if err != nil {
		t.Fatal(err)
	}
	var plain []byte
	for i := 0; i*unit < size; i++ {
		if len(file) < 4096+(i+1)*unit {
			t.Fatalf("container truncated at unit %d", i)
		}
		ct := file[4096+i*unit : 4096+(i+1)*unit]
		pt := make([]byte, unit)
		if !bytes.Equal(ct, make([]byte, unit)) { // all U bytes zero: never written
			c.Decrypt(pt, ct, uint64(i))
		}
		plain = append(plain, pt...)
	}
	if !bytes.Equal(plain[size:], make([]byte, len(plain)-size)) {
		t.Fatal("padding after the logical size is not zero")
	}
	return plain[:size]
}

// Sections 3.1-3.3: open the example container file from scratch.
func TestDecryptContainer(t *testing.T) {
	v := vectors(t)["container"]
	file, err := os.ReadFile("../../docs/" + v["file"])
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(file)
	if hex.EncodeToString(sum[:]) != v["file_sha256"] {
		t.Fatal("file hash differs from the vector")
	}
	d := derive(t, hx(t, v["dek"]))
	h, err := readHeader(file, d)
	if err != nil {
		t.Fatal(err)
	}
	// At rest both slots carry the same header (3.1, case a).
	if h.state != "ok" {
		t.Errorf("the example file's header slots are in state %q, want ok (both slots equal)", h.state)
	}
	best := h.slot
	if best[11] != 2 || best[72] != 1 || string(best[74:74+int(best[73])]) != v["owner"] {
		t.Fatalf("kind %d purpose %d owner %q", best[11], best[72], best[74:74+int(best[73])])
	}
	size := int(le64(best[24:]))
	unit := int(binary.LittleEndian.Uint32(best[32:]))
	if strconv.Itoa(size) != v["size"] || unit != 4096 {
		t.Fatalf("size %d unit %d", size, unit)
	}
	psum := sha256.Sum256(decryptPayload(t, file, h, d))
	if hex.EncodeToString(psum[:]) != v["plaintext_sha256"] {
		t.Fatal("decrypted plaintext hash differs")
	}
}

// editFile runs the edit steps of a section 3.6 vector.
func editFile(t *testing.T, file []byte, edit string, macKey []byte) []byte {
	b := append([]byte(nil), file...)
	atoi := func(s string) int {
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
			b[atoi(f[1])] ^= 1
		case len(f) == 3 && f[0] == "set":
			copy(b[atoi(f[1]):], hx(t, f[2]))
		case len(f) == 4 && f[0] == "copy":
			src, dst, n := atoi(f[1]), atoi(f[2]), atoi(f[3])
			copy(b[dst:dst+n], b[src:src+n])
		case len(f) == 3 && f[0] == "add64":
			o := atoi(f[1])
			binary.LittleEndian.PutUint64(b[o:], le64(b[o:])+uint64(int64(atoi(f[2]))))
		case len(f) == 2 && f[0] == "remac":
			s := b[atoi(f[1])*512:][:512]
			m := hmac.New(sha256.New, macKey)
			m.Write(s[:480])
			copy(s[480:], m.Sum(nil))
		default:
			t.Fatalf("unknown edit step %q", step)
		}
	}
	return b
}

// kindByName is section 5's table of names and kinds.
var kindByName = map[string]byte{".vmdk": 1, ".nvram": 2, ".vswp": 3, ".vmsn": 4, ".vmss": 5, ".vmem": 6}

// Section 3.6: each negative vector reaches its outcome with this reader.
func TestNegativeVectors(t *testing.T) {
	vecs := vectors(t)
	n := 0
	for name, v := range vecs {
		if !strings.HasPrefix(name, "neg_") {
			continue
		}
		n++
		t.Run(name, func(t *testing.T) {
			if v["from"] == "wrap" {
				w := vecs["wrap"]
				if v["outcome"] != "aead-failure" {
					t.Fatalf("outcome %q", v["outcome"])
				}
				locked := hx(t, w["locked"])
				wk, _ := hkdf.Key(sha256.New, hx(t, w["kek"]), locked[1:33], "vmcryptd v1 dek-wrap", 32)
				block, _ := aes.NewCipher(wk)
				gcm, _ := cipher.NewGCM(block)
				open := func(purpose, owner string) error {
					ad := []byte("vmcryptd v1 wrapped-dek")
					for _, f := range []string{purpose, owner, w["provider"], w["key_id"]} {
						ad = append(ad, field(f)...)
					}
					_, err := gcm.Open(nil, make([]byte, 12), locked[33:], ad)
					return err
				}
				if err := open(w["purpose"], w["owner"]); err != nil {
					t.Fatalf("the wrap vector does not open under its own binding: %v", err)
				}
				if err := open(v["purpose"], v["owner"]); err == nil {
					t.Fatalf("opened under purpose %q owner %q", v["purpose"], v["owner"])
				}
				return
			}
			cv := vecs["container"]
			base, err := os.ReadFile("../../docs/" + v["file"])
			if err != nil {
				t.Fatal(err)
			}
			d := derive(t, hx(t, cv["dek"]))
			file := editFile(t, base, v["edit"], d.mac)
			h, err := readHeader(file, d)
			want := v["outcome"]
			switch {
			case want == "tampered":
				if err == nil {
					t.Fatalf("read as %q from slot %d, want refused as tampered", h.state, h.index)
				}
				return
			case err != nil:
				t.Fatalf("refused (%v), want %s", err, want)
			case want == "kind-mismatch":
				if k := kindByName[filepath.Ext(v["name"])]; h.slot[11] == k {
					t.Fatalf("kind %d fits the name %s", h.slot[11], v["name"])
				}
				return
			}
			if k := kindByName[filepath.Ext(v["name"])]; h.slot[11] != k {
				t.Fatalf("kind %d does not fit the name %s", h.slot[11], v["name"])
			}
			if h.state != want || strconv.Itoa(h.index) != v["slot"] {
				t.Fatalf("state %q from slot %d, want %q from slot %s", h.state, h.index, want, v["slot"])
			}
			plain := decryptPayload(t, file, h, d)
			sum := sha256.Sum256(plain)
			if strconv.Itoa(len(plain)) != v["size"] || hex.EncodeToString(sum[:]) != v["plaintext_sha256"] {
				t.Fatalf("%d bytes with sha256 %x, want %s bytes with %s", len(plain), sum, v["size"], v["plaintext_sha256"])
			}
		})
	}
	if n < 4 {
		t.Fatalf("FORMAT.md has %d negative vectors", n)
	}
}

// Section 6: the documented openssl commands derive the same XTS key.
func TestOpenSSLRecoveryKDF(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("openssl not installed (make deps installs it)")
		}
		t.Skip("openssl not installed")
	}
	v := vectors(t)["kdf"]
	out, err := exec.Command("openssl", "kdf", "-keylen", "32", "-kdfopt", "digest:SHA256", "-kdfopt", "mode:EXTRACT_ONLY",
		"-kdfopt", "hexkey:"+v["dek"], "-kdfopt", "salt:vmcryptd v1 container", "HKDF").Output()
	if err != nil {
		t.Fatalf("openssl kdf extract: %v", err)
	}
	prk := strings.ToLower(strings.ReplaceAll(strings.TrimSpace(string(out)), ":", ""))
	if prk != v["prk"] {
		t.Fatalf("openssl PRK %s, want %s", prk, v["prk"])
	}
	keyFile := t.TempDir() + "/xts.key"
	if out, err := exec.Command("openssl", "kdf", "-keylen", "64", "-kdfopt", "digest:SHA256", "-kdfopt", "mode:EXPAND_ONLY",
		"-kdfopt", "hexkey:"+prk, "-kdfopt", "hexinfo:787473"+v["file_id"], "-binary", "-out", keyFile, "HKDF").CombinedOutput(); err != nil {
		t.Fatalf("openssl kdf expand: %v: %s", err, out)
	}
	key, _ := os.ReadFile(keyFile)
	if hex.EncodeToString(key) != v["xts_key"] {
		t.Fatal("openssl-derived XTS key differs")
	}
}

// Section 4.2: open encryption.data and restore the vmx.
func TestVMXData(t *testing.T) {
	v := vectors(t)["vmxdata"]
	prk, _ := hkdf.Extract(sha256.New, hx(t, v["dek"]), []byte("vmcryptd v1 container"))
	key, _ := hkdf.Expand(sha256.New, prk, "vmx-data", 32)
	block, _ := aes.NewCipher(key)
	gcm, _ := cipher.NewGCM(block)
	raw, err := base64.StdEncoding.DecodeString(v["data"])
	if err != nil {
		t.Fatal(err)
	}
	if raw[0] != 1 || !bytes.Equal(raw[1:13], hx(t, v["nonce"])) {
		t.Fatal("bad version or nonce")
	}
	p, err := gcm.Open(nil, raw[1:13], raw[13:], []byte("vmcryptd v1 vmx-data"+v["vm_id"]))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, hx(t, v["plaintext"])) {
		t.Fatal("plaintext records differ")
	}
	// Re-insert each line at its index into the remaining vmx.
	var lines [][]byte
	rest := hx(t, v["vmx_rest"])
	for len(rest) > 0 {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			lines, rest = append(lines, rest), nil
			break
		}
		lines, rest = append(lines, rest[:i+1]), rest[i+1:]
	}
	for len(p) > 0 {
		idx, n := int(binary.LittleEndian.Uint32(p)), int(binary.LittleEndian.Uint32(p[4:]))
		line := p[8 : 8+n]
		p = p[8+n:]
		if idx > 0 && idx <= len(lines) && !bytes.HasSuffix(lines[idx-1], []byte("\n")) {
			lines[idx-1] = append(append([]byte(nil), lines[idx-1]...), '\n')
		}
		lines = append(lines[:idx], append([][]byte{line}, lines[idx:]...)...)
	}
	if !bytes.Equal(bytes.Join(lines, nil), hx(t, v["vmx"])) {
		t.Fatal("restored vmx differs")
	}
}

// Section 3.4: build a keySafe copy from the table.
func TestKeySafeAreaCopy(t *testing.T) {
	v := vectors(t)["keysafe_area"]
	seq, _ := strconv.ParseUint(v["seq"], 10, 64)
	cp := make([]byte, 1536)
	copy(cp, "VMCKSAFE")
	binary.LittleEndian.PutUint64(cp[8:], seq)
	binary.LittleEndian.PutUint16(cp[16:], uint16(len(v["keysafe"])))
	copy(cp[18:], v["keysafe"])
	h := sha256.Sum256(cp[:1504])
	copy(cp[1504:], h[:])
	sum := sha256.Sum256(cp) // the whole 1536 bytes, hash field included
	if hex.EncodeToString(cp[:32]) != v["copy_head"] || hex.EncodeToString(cp[1504:]) != v["hash"] || hex.EncodeToString(sum[:]) != v["copy_sha256"] {
		t.Fatal("keySafe copy differs from the vector")
	}
}

// script returns the ```python block of FORMAT.md whose first line is
// "# NAME: ...", written to a temporary file.
type vector = map[string]string

func script(t *testing.T, name string) string {
	raw, err := os.ReadFile(doc)
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(raw), "```python\n# "+name+":")
	body, _, closed := strings.Cut(rest, "\n```\n")
	if !ok || !closed {
		t.Fatalf("FORMAT.md has no python block %s", name)
	}
	p := t.TempDir() + "/" + name
	if err := os.WriteFile(p, []byte("# "+name+":"+body+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// debianPython is the interpreter whose cryptography package make deps
// installs (python3-cryptography comes with python3-pykmip); a python3
// earlier on PATH (pyenv) may lack it.
const debianPython = "/usr/bin/python3"

func needPythonCryptography(t *testing.T) {
	if err := exec.Command(debianPython, "-c", "import cryptography.hazmat.primitives.ciphers.aead").Run(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("python3 with the cryptography package is needed (python3-cryptography; make deps installs it with python3-pykmip): %v", err)
		}
		t.Skipf("python3 with the cryptography package not available: %v", err)
	}
}

// Section 6: the printed scripts unwrap the DEK and decrypt containers,
// and refuse what section 3.6 says must be refused.
func TestRecoveryScripts(t *testing.T) {
	needPythonCryptography(t)
	vecs := vectors(t)
	unwrap, decrypt := script(t, "unwrap-dek.py"), script(t, "decrypt-container.py")
	w := vecs["wrap"]
	run := func(args ...string) (string, string, int) {
		var out, errb bytes.Buffer
		cmd := exec.Command(debianPython, args...)
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out.String()), errb.String(), code
	}
	if out, stderr, code := run(unwrap, w["kek"], w["keysafe"], w["purpose"], w["owner"]); code != 0 || out != w["dek"] {
		t.Fatalf("unwrap-dek.py: exit %d, printed %q (%s), want the vector's DEK", code, out, stderr)
	}
	for name, v := range vecs {
		if v["from"] != "wrap" {
			continue
		}
		if out, _, code := run(unwrap, w["kek"], w["keysafe"], v["purpose"], v["owner"]); code == 0 || out != "" {
			t.Errorf("%s: unwrap-dek.py under purpose %q owner %q: exit %d, printed %q", name, v["purpose"], v["owner"], code, out)
		}
	}

	cv := vecs["container"]
	base, err := os.ReadFile("../../docs/" + cv["file"])
	if err != nil {
		t.Fatal(err)
	}
	d := derive(t, hx(t, cv["dek"]))
	cases := map[string]vector{"container": {"outcome": "ok", "size": cv["size"], "plaintext_sha256": cv["plaintext_sha256"]}}
	for name, v := range vecs {
		if strings.HasPrefix(name, "neg_") && v["file"] != "" {
			cases[name] = v
		}
	}
	for name, v := range cases {
		dir := t.TempDir()
		in, out := dir+"/in", dir+"/out"
		file := base
		if v["edit"] != "" {
			file = editFile(t, base, v["edit"], d.mac)
		}
		if err := os.WriteFile(in, file, 0o600); err != nil {
			t.Fatal(err)
		}
		_, stderr, code := run(decrypt, cv["dek"], in, out)
		wantCode := map[string]int{"ok": 0, "interrupted": 0, "kind-mismatch": 0, "degraded": 2, "tampered": 1}[v["outcome"]]
		if code != wantCode {
			t.Errorf("%s: decrypt-container.py exit %d, want %d for %s: %s", name, code, wantCode, v["outcome"], stderr)
			continue
		}
		switch v["outcome"] {
		case "tampered":
			if _, err := os.Stat(out); err == nil {
				t.Errorf("%s: a refused container left an output file", name)
			}
			continue
		case "kind-mismatch": // the script reports the kind; the name is the reader's to check
			if !strings.Contains(stderr, "kind 3,") {
				t.Errorf("%s: the script does not report kind 3: %s", name, stderr)
			}
			continue
		}
		plain, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(plain)
		if strconv.Itoa(len(plain)) != v["size"] || hex.EncodeToString(sum[:]) != v["plaintext_sha256"] {
			t.Errorf("%s: decrypt-container.py wrote %d bytes (sha256 %x), want %s", name, len(plain), sum, v["size"])
		}
	}
}

// Section 2.2: every keySafe of the document matches the grammar, and
// escaping the decoded fields (every byte but A-Z a-z 0-9 as lower-case
// %xx) gives back the very same string.
func TestKeySafeGrammar(t *testing.T) {
	echar := `(?:[A-Za-z0-9]|%[0-9a-f]{2})`
	pair := `pair/\(fqid/<VMWARE-NULL>/(` + echar + `+)/(` + echar + `+),(VMCRYPTD%2dV1%2dHKDF%2dSHA%2d256%2dAES%2d256%2dGCM),(` + echar + `+)\)`
	grammar := regexp.MustCompile(`^vmware:key/list/\(` + pair + `(?:,` + pair + `)*\)$`)
	esc := func(s string) string {
		var b strings.Builder
		for i := 0; i < len(s); i++ {
			c := s[i]
			if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
				b.WriteByte(c)
			} else {
				fmt.Fprintf(&b, "%%%02x", c)
			}
		}
		return b.String()
	}
	for _, name := range []string{"wrap", "keysafe_area"} {
		ks := vectors(t)[name]["keysafe"]
		m := grammar.FindStringSubmatch(ks)
		if m == nil {
			t.Errorf("%s keySafe does not match the 2.2 grammar: %s", name, ks)
			continue
		}
		for _, f := range m[1:] {
			u, err := url.PathUnescape(f)
			if err != nil || esc(u) != f {
				t.Errorf("%s keySafe field %q is not the canonical escape of %q (%v)", name, f, u, err)
			}
		}
	}
}

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
	"net/url"
	"os"
	"os/exec"
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

// Sections 3.1-3.4: open the example container file from scratch.
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
	var best []byte
	var bestSeq uint64
	for slot := 0; slot < 2; slot++ {
		s := file[slot*512 : slot*512+512]
		if string(s[:8]) != "VMCRYPTD" || binary.LittleEndian.Uint16(s[8:]) != 1 || int(s[10]) != slot {
			continue
		}
		if !bytes.Equal(s[56:72], d.fp) {
			t.Fatalf("slot %d: fingerprint mismatch", slot)
		}
		m := hmac.New(sha256.New, d.mac)
		m.Write(s[:480])
		if !hmac.Equal(m.Sum(nil), s[480:512]) {
			continue
		}
		if seq := binary.LittleEndian.Uint64(s[16:]); best == nil || seq > bestSeq {
			best, bestSeq = s, seq
		}
	}
	if best == nil {
		t.Fatal("no valid header slot")
	}
	if best[11] != 2 || best[72] != 1 || string(best[74:74+int(best[73])]) != v["owner"] {
		t.Fatalf("kind %d purpose %d owner %q", best[11], best[72], best[74:74+int(best[73])])
	}
	size := int(binary.LittleEndian.Uint64(best[24:]))
	unit := int(binary.LittleEndian.Uint32(best[32:]))
	payload := int(binary.LittleEndian.Uint32(best[36:]))
	if strconv.Itoa(size) != v["size"] || unit != 4096 || payload != 4096 {
		t.Fatalf("size %d unit %d payload %d", size, unit, payload)
	}
	c, err := xts.NewCipher(aes.NewCipher, xtsKey(t, d.prk, best[40:56]))
	if err != nil {
		t.Fatal(err)
	}
	var plain []byte
	for i := 0; i*unit < size; i++ {
		ct := file[payload+i*unit : payload+(i+1)*unit]
		pt := make([]byte, unit)
		if !bytes.Equal(ct, make([]byte, unit)) { // all-zero unit reads as zeros
			c.Decrypt(pt, ct, uint64(i))
		}
		plain = append(plain, pt...)
	}
	if !bytes.Equal(plain[size:], make([]byte, len(plain)-size)) {
		t.Fatal("padding after the logical size is not zero")
	}
	psum := sha256.Sum256(plain[:size])
	if hex.EncodeToString(psum[:]) != v["plaintext_sha256"] {
		t.Fatal("decrypted plaintext hash differs")
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

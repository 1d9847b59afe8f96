package labkms

import (
	"bytes"
	"cmp"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/ttlv"

	"github.com/vmcryptd/vmcryptd/internal/atomicfile"
)

// storeFormat names the on-disk layout of the object store, so a future
// layout can be told apart instead of misread.
const storeFormat = "vmcryptd-labkms-store-v1"

// object is one managed object. Every attribute, including the ones the
// server manages (State, dates, Unique Identifier...), lives in attrs, so
// Get Attributes, Locate and persistence treat them alike.
type object struct {
	uid string
	// seq orders objects by creation (Initial Date has one-second
	// resolution, too coarse to tell two keys apart).
	seq   uint64
	owner string
	attrs []kmip.Attribute
	// sealed is the key material under the master key (AES-256-GCM,
	// nonce || ciphertext, associated data = uid); nil once destroyed.
	sealed []byte
}

func (o *object) clone() *object {
	c := *o
	c.attrs = slices.Clone(o.attrs)
	return &c
}

// values returns every instance of the named attribute, in index order.
func (o *object) values(name kmip.AttributeName) []any {
	var out []any
	for _, a := range o.attrs {
		if a.AttributeName == name {
			out = append(out, a.AttributeValue)
		}
	}
	return out
}

func (o *object) value(name kmip.AttributeName) (any, bool) {
	for _, a := range o.attrs {
		if a.AttributeName == name {
			return a.AttributeValue, true
		}
	}
	return nil, false
}

// set replaces the single instance of name (or adds it).
func (o *object) set(name kmip.AttributeName, v any) {
	for i, a := range o.attrs {
		if a.AttributeName == name {
			o.attrs[i].AttributeValue = v
			return
		}
	}
	o.attrs = append(o.attrs, kmip.Attribute{AttributeName: name, AttributeValue: v})
}

// add appends a new instance of name and returns its index.
func (o *object) add(name kmip.AttributeName, v any) int32 {
	n := int32(len(o.values(name)))
	o.attrs = append(o.attrs, kmip.Attribute{AttributeName: name, AttributeValue: v})
	return n
}

// position finds the slice position of instance index of name.
func (o *object) position(name kmip.AttributeName, index int32) int {
	n := int32(0)
	for i, a := range o.attrs {
		if a.AttributeName != name {
			continue
		}
		if n == index {
			return i
		}
		n++
	}
	return -1
}

func (o *object) state() kmip.State {
	v, _ := o.value(kmip.AttributeNameState)
	st, _ := v.(kmip.State)
	return st
}

// touch records a change, as KMIP's Last Change Date.
func (o *object) touch(now time.Time) {
	o.set(kmip.AttributeNameLastChangeDate, now)
}

// store keeps the lab KMS objects in memory and in one JSON file, with
// key material sealed under the master key. Every change rewrites the file
// atomically; a lab KMS holds a handful of keys, so simplicity wins over
// write amplification.
type store struct {
	path string
	aead cipher.AEAD

	mu      sync.Mutex
	objs    map[string]*object
	lastSeq uint64
}

type storeFile struct {
	Format  string       `json:"format"`
	Objects []objectFile `json:"objects"`
}

type objectFile struct {
	UID   string `json:"uid"`
	Seq   uint64 `json:"seq"`
	Owner string `json:"owner,omitempty"`
	// Attributes is the object's attribute list in the KMIP JSON encoding
	// (a TemplateAttribute structure), readable and typed.
	Attributes json.RawMessage `json:"attributes"`
	// Key is the sealed key material; absent once destroyed.
	Key []byte `json:"sealed_key,omitempty"`
}

func openStore(path string, masterKey []byte, logger *slog.Logger) (*store, error) {
	if logger == nil {
		logger = slog.Default()
	}
	block, err := aes.NewCipher(masterKey)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	s := &store{path: path, aead: aead, objs: map[string]*object{}}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read object store: %w", err)
	}
	var f struct {
		Format  string            `json:"format"`
		Objects []json.RawMessage `json:"objects"`
	}
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("object store %s: %w", path, err)
	}
	if f.Format != storeFormat {
		return nil, fmt.Errorf("object store %s: format %q, want %q", path, f.Format, storeFormat)
	}
	var bad []quarantined
	var sealErr error
	sealed, opened := 0, 0
	for i, raw := range f.Objects {
		o, err := s.loadObject(raw)
		if errors.Is(err, errSealed) {
			sealed++
			sealErr = cmp.Or(sealErr, err)
		} else if o != nil && o.sealed != nil {
			sealed++
			opened++
		}
		if err != nil {
			bad = append(bad, quarantined{Index: i, Reason: err.Error(), Object: raw})
			continue
		}
		s.lastSeq = max(s.lastSeq, o.seq)
		s.objs[o.uid] = o
	}
	if sealed > 0 && opened == 0 {
		// Not one key opens: the master key is wrong, not the objects.
		return nil, fmt.Errorf("object store %s: %w", path, sealErr)
	}
	if len(bad) > 0 {
		// Moved aside before anything is served, so the next save (which
		// rewrites the store without them) loses nothing.
		qpath, err := writeQuarantine(path, bad)
		if err != nil {
			return nil, fmt.Errorf("object store %s: quarantine %d bad objects: %w", path, len(bad), err)
		}
		for _, q := range bad {
			logger.Error("lab kms: stored object quarantined; every other object is served", "store", path, "quarantine", qpath, "index", q.Index, "reason", q.Reason)
		}
		if err := s.saveLocked(); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// errSealed marks an object whose sealed key does not open.
var errSealed = errors.New("sealed key")

// loadObject parses and checks one stored object. Its errors name the
// object (its uid, when it has one).
func (s *store) loadObject(raw json.RawMessage) (*object, error) {
	var of objectFile
	if err := json.Unmarshal(raw, &of); err != nil {
		return nil, fmt.Errorf("object: %w", err)
	}
	if of.UID == "" {
		return nil, errors.New("object with an empty uid")
	}
	if _, dup := s.objs[of.UID]; dup {
		return nil, fmt.Errorf("object %s: duplicate uid", of.UID)
	}
	var ta kmip.TemplateAttribute
	if err := ttlv.UnmarshalJSON(of.Attributes, &ta); err != nil {
		return nil, fmt.Errorf("object %s: attributes: %w", of.UID, err)
	}
	o := &object{uid: of.UID, seq: of.Seq, owner: of.Owner, attrs: ta.Attribute, sealed: of.Key}
	if o.sealed != nil {
		// Check now that the master key opens it: a wrong master key
		// should stop the server at start, not fail a Get hours later.
		k, err := s.unseal(o)
		if err != nil {
			return nil, fmt.Errorf("object %s: %w: %w", of.UID, errSealed, err)
		}
		clear(k)
	}
	return o, nil
}

// quarantined is a stored object the store could not load, kept verbatim.
type quarantined struct {
	Index  int             `json:"index"`
	Reason string          `json:"reason"`
	Object json.RawMessage `json:"object"`
}

// writeQuarantine adds bad to the store's quarantine file (PATH.quarantine,
// JSON lines), durably, and returns its path. Key material in it stays
// sealed as it was in the store.
func writeQuarantine(path string, bad []quarantined) (string, error) {
	qpath := path + ".quarantine"
	old, err := os.ReadFile(qpath)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return qpath, err
	}
	var buf bytes.Buffer
	buf.Write(old)
	for _, q := range bad {
		line, err := json.Marshal(q)
		if err != nil {
			return qpath, err
		}
		buf.Write(line)
		buf.WriteByte('\n')
	}
	return qpath, atomicfile.Write(qpath, buf.Bytes(), 0o600)
}

func (s *store) seal(uid string, key []byte) ([]byte, error) {
	nonce := make([]byte, s.aead.NonceSize(), s.aead.NonceSize()+len(key)+s.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return s.aead.Seal(nonce, nonce, key, []byte(uid)), nil
}

// unseal returns a fresh copy of the key material; the caller zeroes it.
func (s *store) unseal(o *object) ([]byte, error) {
	if o.sealed == nil {
		return nil, errors.New("key material destroyed")
	}
	n := s.aead.NonceSize()
	if len(o.sealed) < n+s.aead.Overhead() {
		return nil, errors.New("sealed key truncated")
	}
	k, err := s.aead.Open(nil, o.sealed[:n], o.sealed[n:], []byte(o.uid))
	if err != nil {
		return nil, errors.New("sealed key does not open under the master key (wrong master key or tampered store)")
	}
	return k, nil
}

// insert adds a new object holding key (sealed here) and persists it.
func (s *store) insert(o *object, key []byte) error {
	sealed, err := s.seal(o.uid, key)
	if err != nil {
		return err
	}
	o.sealed = sealed
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.objs[o.uid]; dup {
		return fmt.Errorf("object %s already exists", o.uid)
	}
	o.seq = s.lastSeq + 1
	s.objs[o.uid] = o
	if err := s.saveLocked(); err != nil {
		delete(s.objs, o.uid)
		return err
	}
	s.lastSeq = o.seq
	return nil
}

var errNoObject = errors.New("no such object")

// view runs fn on the object under the store lock; fn must not keep it.
func (s *store) view(uid string, fn func(o *object) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.objs[uid]
	if !ok {
		return errNoObject
	}
	return fn(o)
}

// update runs fn on a copy of the object and, if fn succeeds, persists the
// copy and makes it current. A failed write leaves memory as it was, so
// memory and disk never disagree.
func (s *store) update(uid string, fn func(o *object) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, ok := s.objs[uid]
	if !ok {
		return errNoObject
	}
	o := old.clone()
	if err := fn(o); err != nil {
		return err
	}
	s.objs[uid] = o
	if err := s.saveLocked(); err != nil {
		s.objs[uid] = old
		return err
	}
	return nil
}

// each calls fn for every object, oldest first, under the store lock.
func (s *store) each(fn func(o *object)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, o := range s.sortedLocked() {
		fn(o)
	}
}

func (s *store) sortedLocked() []*object {
	objs := make([]*object, 0, len(s.objs))
	for _, o := range s.objs {
		objs = append(objs, o)
	}
	slices.SortFunc(objs, func(a, b *object) int {
		if a.seq != b.seq {
			return cmp.Compare(a.seq, b.seq)
		}
		return strings.Compare(a.uid, b.uid)
	})
	return objs
}

func (s *store) saveLocked() error {
	f := storeFile{Format: storeFormat}
	for _, o := range s.sortedLocked() {
		ta := kmip.TemplateAttribute{Attribute: o.attrs}
		f.Objects = append(f.Objects, objectFile{
			UID:        o.uid,
			Seq:        o.seq,
			Owner:      o.owner,
			Attributes: json.RawMessage(ttlv.MarshalJSON(&ta)),
			Key:        o.sealed,
		})
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	if err := enc.Encode(&f); err != nil {
		return fmt.Errorf("encode object store: %w", err)
	}
	if err := atomicfile.Write(s.path, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("save object store: %w", err)
	}
	return nil
}

package fusefs

import (
	"bytes"
	"crypto/rand"
	"os"
	"testing"

	"github.com/hanwen/go-fuse/v2/fs"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// TestEncryptedReadsPlaintextStoresCiphertext is the property the view
// exists for: what goes in through the mount comes back as plaintext
// through the mount, while the backing file is a container holding none
// of it.
func TestEncryptedReadsPlaintextStoresCiphertext(t *testing.T) {
	// The type that serves encrypted files must never offer the kernel
	// the backing descriptor.
	if _, ok := any(&encHandle{}).(fs.FilePassthroughFder); ok {
		t.Fatal("encHandle implements FilePassthroughFder")
	}
	for _, cfg := range []struct {
		name string
		opts Options
	}{
		{"writeback", Options{}},
		// Passthrough on for the mount: plain files use it, encrypted
		// files must not.
		{"passthrough", Options{NoWritebackCache: true, Passthrough: true}},
	} {
		t.Run(cfg.name, func(t *testing.T) { testPlaintextAtRest(t, cfg.opts) })
	}
}

func testPlaintextAtRest(t *testing.T, opts Options) {
	m := mountTest(t, opts)
	// Recognisable plaintext: if any 64-byte run of it appears at rest,
	// the view leaked.
	plain := bytes.Repeat([]byte("SECRET-PLAINTEXT-0123456789abcdef"), 4000)
	if err := os.WriteFile(m.view("enc/disk-flat.vmdk"), plain, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(m.view("enc/disk-flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, plain) {
		t.Fatalf("read back %d bytes, differs from the %d written", len(got), len(plain))
	}
	st, err := os.Stat(m.view("enc/disk-flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != int64(len(plain)) {
		t.Errorf("view size %d, want logical size %d", st.Size(), len(plain))
	}

	raw, err := os.ReadFile(m.backing("enc/disk-flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(raw, []byte(container.ContainerMagic)) {
		t.Fatalf("backing file does not start with the container magic")
	}
	if bytes.Contains(raw, plain[:64]) || bytes.Contains(raw, []byte("SECRET-PLAINTEXT")) {
		t.Fatal("plaintext found in the backing file")
	}
	// Independent check: the engine opens the backing file and decrypts
	// the same bytes.
	waitReleased(t, m.v)
	c, err := container.OpenContainer(m.backing("enc/disk-flat.vmdk"), m.b.dek, true, "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, len(plain))
	if _, err := c.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, plain) {
		t.Fatal("engine decrypts the backing file to something else")
	}

	// A plain file stays plain at rest.
	secret := make([]byte, 10000)
	rand.Read(secret)
	if err := os.WriteFile(m.view("plain.bin"), secret, 0o644); err != nil {
		t.Fatal(err)
	}
	raw, err = os.ReadFile(m.backing("plain.bin"))
	if err != nil || !bytes.Equal(raw, secret) {
		t.Fatalf("plain file not stored as is (err %v)", err)
	}
}

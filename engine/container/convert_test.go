package container

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/internal/testkit"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"golang.org/x/sys/unix"
)

func writeSparse(t *testing.T, path string, size int64, chunks map[int64][]byte) []byte {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for off, p := range chunks {
		f.WriteAt(p, off)
		copy(want[off:], p)
	}
	return want
}

func TestConvertRoundTrip(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		size   int64
		chunks map[int64][]byte
		unit   int
	}{
		{"empty", 0, nil, 4096},
		{"tiny odd", 8684, map[int64][]byte{0: testkit.RandBytes(8684)}, 4096},
		{"sparse", 64 << 20, map[int64][]byte{0: testkit.RandBytes(5000), 20 << 20: testkit.RandBytes(1 << 20), 64<<20 - 100: testkit.RandBytes(100)}, 4096},
		{"dense multi-chunk", 9<<20 + 17, map[int64][]byte{0: testkit.RandBytes(9<<20 + 17)}, 512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "f.bin")
			want := writeSparse(t, path, tc.size, tc.chunks)
			dek := testkit.MustDEK(t)
			var done int64
			opts := CreateOptions{Kind: KindOther, Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: "vm-1"}, UnitSize: tc.unit}
			if err := EncryptFile(ctx, path, dek, opts, func(n int64) { done += n }); err != nil {
				t.Fatal(err)
			}
			noTemps(t, dir)
			raw, _ := os.ReadFile(path)
			if string(raw[:8]) != ContainerMagic {
				t.Fatal("not a container after EncryptFile")
			}
			for off, p := range tc.chunks {
				if len(p) >= 32 && bytes.Contains(raw, p[:32]) {
					t.Fatalf("plaintext at %d visible", off)
				}
			}
			if tc.size > 32<<20 {
				// Holes stayed holes: the file uses far less than its size.
				var st unix.Stat_t
				unix.Stat(path, &st)
				if st.Blocks*512 > 8<<20 {
					t.Fatalf("container allocates %d bytes for a sparse file", st.Blocks*512)
				}
			}
			c, err := OpenContainer(path, dek, true, "")
			if err != nil {
				t.Fatal(err)
			}
			checkContents(t, c, want)
			c.Close()

			dek2 := testkit.MustDEK(t)
			if err := RekeyFile(ctx, path, dek, dek2, CreateOptions{Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: "vm-1"}}, nil); err != nil {
				t.Fatal(err)
			}
			if _, err := OpenContainer(path, dek, true, ""); err == nil {
				t.Fatal("old DEK still opens the file after deep rekey")
			}
			if err := DecryptFile(ctx, path, dek2, nil); err != nil {
				t.Fatal(err)
			}
			got, _ := os.ReadFile(path)
			if !bytes.Equal(got, want) {
				t.Fatal("decrypted file differs from the original")
			}
		})
	}
}

// A failed conversion (here: wrong key) leaves the original untouched.
func TestConvertFailureKeepsOriginal(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f.bin")
	os.WriteFile(path, []byte("plain data"), 0o600)
	dek := testkit.MustDEK(t)
	if err := DecryptFile(context.Background(), path, dek, nil); err == nil {
		t.Fatal("decrypting a plain file succeeded")
	}
	got, _ := os.ReadFile(path)
	if string(got) != "plain data" {
		t.Fatal("original changed")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	big := filepath.Join(dir, "big.bin")
	want := writeSparse(t, big, 8<<20, map[int64][]byte{0: testkit.RandBytes(8 << 20)})
	if err := EncryptFile(ctx, big, dek, CreateOptions{Kind: KindOther, Binding: keys.Binding{Purpose: keys.PurposeVM, OwnerID: "v"}}, nil); err == nil {
		t.Fatal("cancelled conversion succeeded")
	}
	got, _ = os.ReadFile(big)
	if !bytes.Equal(got, want) {
		t.Fatal("cancelled conversion changed the original")
	}
	noTemps(t, dir)
}

// NoTemps requires dir to hold no conversion temporary file.
func noTemps(t *testing.T, dir string) {
	t.Helper()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if IsTempName(e.Name()) {
			t.Fatalf("temporary file %s left behind", e.Name())
		}
	}
}

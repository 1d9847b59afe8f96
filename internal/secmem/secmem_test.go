package secmem

import (
	"bytes"
	"testing"
)

func TestAllocFree(t *testing.T) {
	for _, n := range []int{1, 32, 64, 4096, 4097} {
		b, err := Alloc(n)
		if err != nil {
			t.Fatalf("Alloc(%d): %v", n, err)
		}
		if b.Len() != n || len(b.Bytes()) != n || cap(b.Bytes()) != n {
			t.Fatalf("Alloc(%d): len %d cap %d", n, len(b.Bytes()), cap(b.Bytes()))
		}
		if !bytes.Equal(b.Bytes(), make([]byte, n)) {
			t.Fatalf("Alloc(%d) not zeroed", n)
		}
		for i := range b.Bytes() {
			b.Bytes()[i] = 0xa5
		}
		if err := b.Free(); err != nil {
			t.Fatal(err)
		}
		if b.Bytes() != nil || b.Len() != 0 {
			t.Fatal("Bytes after Free")
		}
		if err := b.Free(); err != nil {
			t.Fatalf("second Free: %v", err)
		}
	}
}

func TestFreeZeroes(t *testing.T) {
	b, err := Alloc(64)
	if err != nil {
		t.Fatal(err)
	}
	for i := range b.Bytes() {
		b.Bytes()[i] = 0xff
	}
	// Reading the mapping after Free would fault, so check the step Free
	// runs before unmapping, over the whole mapping including slack.
	b.mem[len(b.mem)-1] = 0xff
	b.wipe()
	if !bytes.Equal(b.mem, make([]byte, len(b.mem))) {
		t.Fatal("wipe left key bytes behind")
	}
	if err := b.Free(); err != nil {
		t.Fatal(err)
	}
}

func TestFromBytesClearsSource(t *testing.T) {
	src := []byte("0123456789abcdef0123456789abcdef")
	want := append([]byte(nil), src...)
	b, err := FromBytes(src)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Free()
	if !bytes.Equal(b.Bytes(), want) {
		t.Fatal("copy differs")
	}
	if !bytes.Equal(src, make([]byte, len(src))) {
		t.Fatal("source not cleared")
	}
}

func TestInvalidSize(t *testing.T) {
	if _, err := Alloc(0); err == nil {
		t.Fatal("Alloc(0) succeeded")
	}
}

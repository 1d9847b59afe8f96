package inspect

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/keys"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/formats/nvram"
	"github.com/vmcryptd/vmcryptd/formats/vmdk"
)

// Bounds the inspection of one input must stay within, whatever its size.
const (
	// rssCap bounds the peak RSS a child process adds, over its baseline,
	// to inspect one input (FORMAT limits: 4 MiB descriptors, vmx and
	// nvram, 8 MiB grain directories).
	rssCap = 64 << 20
	// timeCap bounds the time of one inspection (a child: start-up
	// included).
	timeCap = 10 * time.Second
	// allocCap bounds the bytes one in-process inspection allocates in
	// all (FuzzInspectFile); it bounds the peak heap as well.
	allocCap = 256 << 20
)

const childEnv = "VMCRYPTD_INSPECT_CHILD"

// TestMain turns the test binary into an inspect child when childEnv
// names a path: it inspects it as `vmcryptd inspect --json` does, prints
// one line (the error, or "ok") and exits.
func TestMain(m *testing.M) {
	if p := os.Getenv(childEnv); p != "" {
		os.Exit(inspectChild(p))
	}
	os.Exit(m.Run())
}

func inspectChild(path string) int {
	// The peak RSS of this process since its exec, for the parent
	// (getrusage of a child reports the parent's RSS at the fork).
	defer func() { fmt.Fprintln(os.Stderr, "VmHWM", procStatus("self", "VmHWM:")) }()
	r, err := InspectWith(path, Options{Detector: vm.DetectContainer})
	if err != nil {
		fmt.Println("error:", err)
		return 0
	}
	if _, err := json.Marshal(r); err != nil {
		fmt.Println("json:", err)
		return 1
	}
	if err := r.WriteText(io.Discard); err != nil {
		fmt.Println("text:", err)
		return 1
	}
	fmt.Println("ok")
	return 0
}

// childRun is the outcome of inspecting one path in a child process.
type childRun struct {
	peakRSS int64 // bytes (VmHWM of the child, as it reports it)
	elapsed time.Duration
	out     string
	killed  string // why the parent killed it, if it did
}

// inspectInChild runs inspect on path in a re-executed test binary,
// polling its RSS and killing it as soon as it exceeds limit bytes or
// runs longer than tcap.
func inspectInChild(t *testing.T, path string, limit int64, tcap time.Duration) childRun {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+path, "GOMAXPROCS=1")
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var (
		mu     sync.Mutex
		killed string
	)
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			why := ""
			if rss := procStatus(strconv.Itoa(cmd.Process.Pid), "VmRSS:"); rss > limit {
				why = fmt.Sprintf("RSS %d MiB over the limit of %d MiB", rss>>20, limit>>20)
			} else if time.Since(start) > tcap {
				why = fmt.Sprintf("still running after %v", tcap)
			}
			if why != "" {
				mu.Lock()
				killed = why
				mu.Unlock()
				cmd.Process.Kill()
				return
			}
		}
	}()
	err := cmd.Wait()
	close(done)
	run := childRun{elapsed: time.Since(start), out: strings.TrimSpace(out.String())}
	mu.Lock()
	run.killed = killed
	mu.Unlock()
	if run.killed != "" {
		return run
	}
	if err != nil {
		t.Fatalf("inspect child on %s: %v\n%s%s", path, err, run.out, stderr.String())
	}
	hwm, ok := strings.CutPrefix(strings.TrimSpace(stderr.String()), "VmHWM ")
	if run.peakRSS, err = strconv.ParseInt(hwm, 10, 64); !ok || err != nil || run.peakRSS <= 0 {
		t.Fatalf("inspect child on %s did not report its peak RSS: %q", path, stderr.String())
	}
	return run
}

// procStatus returns a memory field of /proc/PID/status (VmRSS:,
// VmHWM:) in bytes; 0 if unknown.
func procStatus(pid, field string) int64 {
	f, err := os.Open("/proc/" + pid + "/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// hostile is an input for the memory and time bounds: files to create in
// a fresh directory, the path to inspect (relative), and what the single
// output line must contain.
type hostile struct {
	name  string
	files func(t *testing.T, dir string)
	arg   string
	want  string
	short bool // also run under -race (make test): the cases
}

// sparseFile writes head at offset 0 of dir/name and extends the file
// with a hole to size bytes.
func sparseFile(t testing.TB, dir, name string, head []byte, size int64) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(head); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(max(size, int64(len(head)))); err != nil {
		t.Fatal(err)
	}
}

// maxSparseHeader is a hosted sparse header with the largest grain
// directory an extent may have (8 MiB), at sector 1.
func maxSparseHeader() []byte {
	h := vmdk.SparseHeader{Version: 1, Flags: 3, Capacity: 1 << 37, GrainSize: 128, NumGTEsPerGT: 512, GDOffset: 1, RGDOffset: 1, OverHead: 1,
		SingleEndLineChar: '\n', NonEndLineChar: ' ', DoubleEndLineChar1: '\r', DoubleEndLineChar2: '\n'}
	b, _ := h.MarshalBinary()
	return b
}

// sparseWithTables is a sparse header with 2^21 directory entries that
// all point at one grain table (overlap false) or each at the next sector
// (overlapping tables, each read on its own): the most work a header can
// ask of inspect's allocation count.
func sparseWithTables(overlap bool) []byte {
	h := vmdk.SparseHeader{Version: 1, Flags: 1, Capacity: 1 << 37, GrainSize: 128, NumGTEsPerGT: 512, GDOffset: 8, OverHead: 8,
		SingleEndLineChar: '\n', NonEndLineChar: ' ', DoubleEndLineChar1: '\r', DoubleEndLineChar2: '\n'}
	b, _ := h.MarshalBinary()
	b = append(b, make([]byte, 7*512)...)
	gd := make([]byte, 4<<21)
	for i := 0; i < len(gd); i += 4 {
		v := uint32(1) // the table at sector 1: the header's own bytes
		if overlap {
			v += uint32(i / 4)
		}
		binary.LittleEndian.PutUint32(gd[i:], v)
	}
	return append(b, gd...)
}

func containerHead(t testing.TB) []byte {
	t.Helper()
	dek, err := keys.NewDEK()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "c")
	c, err := container.CreateContainer(p, dek, container.CreateOptions{Kind: container.KindExtent, Binding: keys.Binding{Purpose: keys.PurposeDisk, OwnerID: "disk-1"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const gib = 1 << 30

func hostileInputs(t *testing.T) []hostile {
	mrvn := []byte(nvram.Magic + "\x01\x00\x00\x00")
	descText := func(n int, line string) []byte {
		return []byte(vmdk.DescriptorMagic + "\nversion=1\ncreateType=\"monolithicFlat\"\n" + strings.Repeat(line, n))
	}
	one := func(name string, head []byte, size int64, want string) hostile {
		return hostile{name: name, arg: name, want: want, files: func(t *testing.T, dir string) { sparseFile(t, dir, name, head, size) }}
	}
	short := func(h hostile) hostile { h.short = true; return h }
	container := containerHead(t)
	return []hostile{
		// Issue 11 item 7: MRVN and zeros used to take ~17 MB per MiB.
		short(one("vm.nvram", mrvn, 256<<20, "exceeds the limit")),
		short(one("big.nvram", mrvn, gib, "exceeds the limit")),
		short(one("small.nvram", mrvn, 4<<20, "more than 1024 entries")),
		short(one("zeros.vmdk", nil, gib, "ok")),
		one("zeros.nvram", nil, gib, "ok"),
		one("zeros.vmx", nil, gib, "exceeds the limit"),
		one("zeros.vmsd", nil, gib, "exceeds the limit"),
		one("newlines.vmx", bytes.Repeat([]byte("\n"), 4<<20), 4<<20, "more than 131072 lines"),
		one("lines.vmx", bytes.Repeat([]byte("a = \"b\"\n"), 100000), 800000, "ok"),
		short(one("desc-holes.vmdk", []byte(vmdk.DescriptorMagic+"\n"), gib, "exceeds limit")),
		one("desc-padded.vmdk", []byte(vmdk.DescriptorMagic+"\n"), 4<<20, "ok"),
		one("desc-lines.vmdk", append([]byte(vmdk.DescriptorMagic+"\n"), bytes.Repeat([]byte("#\n"), 2<<20)...), 4<<20+22, "exceeds"),
		one("desc-extents.vmdk", descText(1<<15+1, "RW 1 ZERO\n"), 0, "more than 32768 extents"),
		short(one("kdmv.vmdk", maxSparseHeader(), gib, "ok")),
		one("gt-same.vmdk", sparseWithTables(false), 16<<20, "ok"),
		one("gt-overlap.vmdk", sparseWithTables(true), 2*gib, "ok"),
		one("cowd.vmdk", []byte("COWD\x01\x00\x00\x00"), gib, "ok"),
		short(one("container.vmdk", container, gib, "ok")),
		one("container.nvram", container, gib, "ok"),
		// Refused by the grain directory budget: reported with a warning.
		{name: "descriptor naming a huge sparse extent 1000 times", arg: "d.vmdk", want: "ok", files: func(t *testing.T, dir string) {
			sparseFile(t, dir, "s.vmdk", maxSparseHeader(), gib)
			os.WriteFile(filepath.Join(dir, "d.vmdk"), descText(1000, "RW 137438953472 SPARSE \"s.vmdk\"\n"), 0o644)
		}},
		{name: "descriptor naming a 1 GiB sparse flat extent 4096 times", arg: "d.vmdk", want: "ok", files: func(t *testing.T, dir string) {
			sparseFile(t, dir, "f.vmdk", nil, gib)
			os.WriteFile(filepath.Join(dir, "d.vmdk"), descText(4096, "RW 2097152 FLAT \"f.vmdk\" 0\n"), 0o644)
		}},
		{name: "VM directory of hostile files", arg: ".", want: "ok", files: func(t *testing.T, dir string) {
			var vmx strings.Builder
			for i := range 2000 {
				fmt.Fprintf(&vmx, "scsi%d:%d.fileName = \"d%d.vmdk\"\n", i/16, i%16, i%50)
			}
			vmx.WriteString("nvram = \"vm.nvram\"\n")
			os.WriteFile(filepath.Join(dir, "vm.vmx"), []byte(vmx.String()), 0o644)
			sparseFile(t, dir, "vm.nvram", mrvn, 256<<20)
			sparseFile(t, dir, "vm.vmsd", nil, gib)
			sparseFile(t, dir, "s.vmdk", maxSparseHeader(), gib)
			for i := range 50 {
				switch i % 3 {
				case 0:
					sparseFile(t, dir, fmt.Sprintf("d%d.vmdk", i), []byte(vmdk.DescriptorMagic+"\n"), 4<<20)
				case 1:
					os.WriteFile(filepath.Join(dir, fmt.Sprintf("d%d.vmdk", i)), descText(100, "RW 137438953472 SPARSE \"s.vmdk\"\n"), 0o644)
				case 2:
					sparseFile(t, dir, fmt.Sprintf("d%d.vmdk", i), maxSparseHeader(), gib)
				}
			}
			if err := syscall.Mkfifo(filepath.Join(dir, "d49.vmdk.lck"), 0o644); err != nil {
				t.Fatal(err)
			}
		}},
	}
}

// TestInspectMemoryBound inspects known-bad inputs (the 256 MiB MRVN file
// of issue 11, 1 GiB sparse files with every magic, tables and counts at
// and past their limits, a VM directory of them) each in a child process,
// and fails if one adds more than rssCap of RSS over a child inspecting a
// tiny file, or runs longer than timeCap. Under -race (make test), whose
// shadow memory about doubles the heap's RSS and whose children start in
// a second, only the short cases run, with twice the RSS allowance and
// three times the time; scripts/fuzz-all.sh runs them all without -race.
func TestInspectMemoryBound(t *testing.T) {
	allow, tcap := int64(rssCap), timeCap
	if raceEnabled {
		allow, tcap = 2*rssCap, 3*timeCap
	}
	base := t.TempDir()
	os.WriteFile(filepath.Join(base, "tiny.vmx"), []byte("displayName = \"x\"\n"), 0o644)
	baseline := inspectInChild(t, filepath.Join(base, "tiny.vmx"), 1<<30, tcap)
	t.Logf("baseline child: peak RSS %d MiB, %v", baseline.peakRSS>>20, baseline.elapsed.Round(time.Millisecond))
	limit := baseline.peakRSS + allow
	var worst int64
	for _, h := range hostileInputs(t) {
		if raceEnabled && !h.short {
			continue
		}
		t.Run(h.name, func(t *testing.T) {
			dir := t.TempDir()
			h.files(t, dir)
			r := inspectInChild(t, filepath.Join(dir, h.arg), limit, tcap)
			t.Logf("peak RSS %d MiB (+%d MiB), %v: %s", r.peakRSS>>20, (r.peakRSS-baseline.peakRSS)>>20, r.elapsed.Round(time.Millisecond), firstLine(r.out))
			worst = max(worst, r.peakRSS-baseline.peakRSS)
			switch {
			case r.killed != "":
				t.Fatalf("killed: %s", r.killed)
			case r.peakRSS > limit:
				t.Fatalf("peak RSS %d MiB over the baseline's %d MiB + %d MiB", r.peakRSS>>20, baseline.peakRSS>>20, allow>>20)
			case strings.Count(r.out, "\n") > 0:
				t.Fatalf("more than one line of output:\n%s", r.out)
			case !strings.Contains(r.out, h.want):
				t.Fatalf("output %q, want %q", r.out, h.want)
			}
		})
	}
	// The corpus FuzzInspectFile built (scripts/fuzz-all.sh passes its
	// directory): every input again, in a child, under the RSS bound.
	if dir := os.Getenv("VMCRYPTD_INSPECT_CORPUS"); dir != "" {
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var slowest time.Duration
		for _, e := range ents {
			name, data, hole, err := decodeCorpusEntry(filepath.Join(dir, e.Name()))
			if err != nil {
				t.Fatalf("%s: %v", e.Name(), err)
			}
			fd := t.TempDir()
			p := filepath.Join(fd, fuzzNames[int(name)%len(fuzzNames)])
			sparseFile(t, fd, filepath.Base(p), data, int64(len(data))+int64(hole)<<15)
			r := inspectInChild(t, p, limit, tcap)
			worst, slowest = max(worst, r.peakRSS-baseline.peakRSS), max(slowest, r.elapsed)
			if r.killed != "" || r.peakRSS > limit {
				t.Errorf("corpus %s: peak RSS %d MiB, %v, killed: %q", e.Name(), r.peakRSS>>20, r.elapsed, r.killed)
			}
		}
		t.Logf("corpus of %d inputs: slowest child %v", len(ents), slowest.Round(time.Millisecond))
	}
	t.Logf("largest RSS increase: %d MiB", worst>>20)
}

// decodeCorpusEntry reads a "go test fuzz v1" file of FuzzInspectFile's
// arguments: byte(...), []byte("..."), uint16(...).
func decodeCorpusEntry(path string) (name uint8, data []byte, hole uint16, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, nil, 0, err
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 4 || lines[0] != "go test fuzz v1" {
		return 0, nil, 0, fmt.Errorf("not a corpus file of three values")
	}
	arg := func(l, typ string) (string, error) {
		v, ok := strings.CutPrefix(l, typ+"(")
		if !ok || !strings.HasSuffix(v, ")") {
			return "", fmt.Errorf("%q is not a %s", l, typ)
		}
		return v[:len(v)-1], nil
	}
	v, err := arg(lines[1], "byte")
	if err != nil {
		if v, err = arg(lines[1], "uint8"); err != nil {
			return 0, nil, 0, err
		}
	}
	if strings.HasPrefix(v, "'") {
		c, uerr := strconv.Unquote(v)
		if uerr != nil || len([]rune(c)) != 1 {
			return 0, nil, 0, fmt.Errorf("%s: bad byte literal", v)
		}
		name = uint8([]rune(c)[0])
	} else {
		n, perr := strconv.ParseUint(v, 0, 8)
		if perr != nil {
			return 0, nil, 0, perr
		}
		name = uint8(n)
	}
	if v, err = arg(lines[2], "[]byte"); err != nil {
		return 0, nil, 0, err
	}
	str, err := strconv.Unquote(v)
	if err != nil {
		return 0, nil, 0, err
	}
	if v, err = arg(lines[3], "uint16"); err != nil {
		return 0, nil, 0, err
	}
	n, err := strconv.ParseUint(v, 0, 16)
	if err != nil {
		return 0, nil, 0, err
	}
	return name, []byte(str), uint16(n), nil
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

// fuzzNames are the names a fuzzed file is inspected under: the
// extension picks the parser for content without a magic.
var fuzzNames = []string{"f.vmdk", "g-flat.vmdk", "f.nvram", "f.vmx", "f.vmsd", "f.vmsn", "f.vswp", "f"}

// FuzzInspectFile inspects whole files: fuzzed leading bytes (seeded with
// every magic inspect knows), a name that picks the parser, and a hole
// that extends the file up to 2 GiB. Each input must be inspected within
// allocCap bytes allocated and timeCap. scripts/fuzz-all.sh runs it under
// an address-space limit and then TestInspectMemoryBound.
func FuzzInspectFile(f *testing.F) {
	rng := rand.New(rand.NewPCG(1, 2))
	random := make([]byte, 4096)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	nv, _ := nvram.New(0, nil)
	desc := []byte(vmdk.DescriptorMagic + "\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"f-flat.vmdk\" 0\nddb.adapterType = \"ide\"\n")
	seeds := [][]byte{
		random,
		append([]byte("VMCRYPTD"), random[:512]...),
		maxSparseHeader(),
		sparseWithTables(false)[:8192],
		[]byte("COWD\x01\x00\x00\x00"),
		[]byte(nvram.Magic + "\x01\x00\x00\x00"),
		nv,
		desc,
		append(append([]byte(nil), desc...), make([]byte, 512-len(desc))...),
		[]byte("displayName = \"x\"\nscsi0:0.fileName = \"f.vmdk\"\nnvram = \"f.nvram\"\n"),
		[]byte("snapshot0.uid = \"1\"\nsnapshot0.filename = \"f.vmsn\"\nsnapshot0.disk0.fileName = \"f.vmdk\"\n"),
	}
	seeds = append(seeds, containerHead(f))
	for i, s := range seeds {
		for _, hole := range []uint16{0, 1024, 0xffff} {
			f.Add(uint8(i), s, hole)
		}
	}
	dir := f.TempDir()
	// The flat extent the seed descriptor names, and a VM around it.
	sparseFile(f, dir, "f-flat.vmdk", nil, 1<<20)
	f.Fuzz(func(t *testing.T, name uint8, data []byte, hole uint16) {
		p := filepath.Join(dir, fuzzNames[int(name)%len(fuzzNames)])
		defer os.Remove(p)
		// hole counts 32 KiB units: up to 2 GiB of holes after data.
		size := int64(len(data)) + int64(hole)<<15
		sparseFile(t, dir, filepath.Base(p), data, size)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		start := time.Now()
		r, err := InspectWith(p, Options{Detector: vm.DetectContainer})
		if err == nil {
			json.Marshal(r)
			r.WriteText(io.Discard)
		} else if strings.Contains(err.Error(), "\n") {
			t.Errorf("error of more than one line: %q", err)
		}
		el := time.Since(start)
		runtime.ReadMemStats(&after)
		if n := after.TotalAlloc - before.TotalAlloc; n > allocCap {
			t.Fatalf("inspect of %d bytes (%d on disk) allocated %d MiB", size, len(data), n>>20)
		}
		if el > timeCap {
			t.Fatalf("inspect of %d bytes took %v", size, el)
		}
	})
}

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmcryptd/vmcryptd/engine/container"
	"github.com/vmcryptd/vmcryptd/engine/vm"
	"github.com/vmcryptd/vmcryptd/internal/api"
	"github.com/vmcryptd/vmcryptd/internal/safeopen"
)

// hostileOpTimeout bounds every CLI call and every open or read through
// the view in the hostile-file suite: nothing may block.
const hostileOpTimeout = 20 * time.Second

// runBounded runs the CLI like vmcryptd() but fails the test, instead of
// waiting, when the call does not end within hostileOpTimeout.
func runBounded(t *testing.T, args ...string) runResult {
	t.Helper()
	return runBoundedFor(t, hostileOpTimeout, args...)
}

// runBoundedFor is runBounded with its own bound.
func runBoundedFor(t *testing.T, bound time.Duration, args ...string) runResult {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Env = append(os.Environ(), asMainEnv+"=1")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	if ctx.Err() != nil {
		t.Errorf("vmcryptd %s: still running after %s (blocked)", strings.Join(args, " "), bound)
		return runResult{stdout.String(), stderr.String(), -1}
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run vmcryptd %v: %v", args, err)
	}
	return runResult{stdout.String(), stderr.String(), code}
}

// statusPoller asks the daemon for its status every 200 ms with a short
// timeout, for as long as the suite runs.
type statusPoller struct {
	stop    chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	polls   int
	fails   []string
	maxWait time.Duration
}

const statusPollTimeout = 3 * time.Second

func pollStatus(sock string) *statusPoller {
	p := &statusPoller{stop: make(chan struct{}), done: make(chan struct{})}
	c := api.NewClient(sock)
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), statusPollTimeout)
			start := time.Now()
			var st api.Status
			err := c.Do(ctx, "GET", "/status", nil, &st)
			took := time.Since(start)
			cancel()
			p.mu.Lock()
			p.polls++
			p.maxWait = max(p.maxWait, took)
			if err != nil {
				p.fails = append(p.fails, fmt.Sprintf("%s: %v", start.Format("15:04:05.000"), err))
			}
			p.mu.Unlock()
		}
	}()
	return p
}

func (p *statusPoller) finish(t *testing.T) {
	t.Helper()
	close(p.stop)
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	t.Logf("daemon status polled %d times during the suite, slowest answer %s", p.polls, p.maxWait.Round(time.Millisecond))
	if p.polls == 0 {
		t.Error("status was never polled")
	}
	for _, f := range p.fails {
		t.Errorf("daemon did not answer status within %s: %s", statusPollTimeout, f)
	}
}

// hostileVM writes a small plain VM (vmx, nvram, a monolithicFlat disk
// of 1 MiB random data) named h into dir, without qemu.
func hostileVM(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("h.vmx", []byte("displayName = \"h\"\nnvram = \"h.nvram\"\nscsi0.present = \"TRUE\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"h.vmdk\"\nscsi0:0.deviceType = \"scsi-hardDisk\"\n"))
	nv := make([]byte, 8684)
	rand.Read(nv)
	copy(nv, "MRVN")
	write("h.nvram", nv)
	write("h.vmdk", []byte(flatDescriptor("h", []string{"h-flat.vmdk"}, 2048)))
	data := make([]byte, 1<<20)
	rand.Read(data)
	write("h-flat.vmdk", data)
}

// flatDescriptor is a monolithicFlat-style descriptor naming extents of
// sectors each.
func flatDescriptor(name string, extents []string, sectors int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\n")
	for _, e := range extents {
		fmt.Fprintf(&b, "RW %d FLAT \"%s\" 0\n", sectors, e)
	}
	fmt.Fprintf(&b, "\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"19\"\nddb.adapterType = \"lsilogic\"\n")
	_ = name
	return b.String()
}

// snapshotTree records every entry of dir: regular files by content,
// symlinks by target, other types by type.
func snapshotTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		st, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			continue // a conversion still running replaced it
		}
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case st.Mode().IsRegular():
			b, err := safeopen.ReadFile(p, 1<<30)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			out[e.Name()] = "file:" + string(b)
		case st.Mode()&os.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			out[e.Name()] = "symlink:" + l
		default:
			out[e.Name()] = "type:" + st.Mode().Type().String()
		}
	}
	return out
}

func diffTrees(a, b map[string]string) []string {
	var d []string
	for k, v := range a {
		if w, ok := b[k]; !ok {
			d = append(d, k+" removed")
		} else if v != w {
			d = append(d, k+" changed")
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			d = append(d, k+" added")
		}
	}
	sort.Strings(d)
	if len(d) > 5 {
		d = append(d[:5], fmt.Sprintf("and %d more", len(d)-5))
	}
	return d
}

// oneLineNaming says whether a failed CLI call's stderr is one line that
// names the file (its base name) the case is about.
func oneLineNaming(stderr, name string) bool {
	s := strings.TrimSpace(stderr)
	return s != "" && !strings.Contains(s, "\n") && strings.Contains(s, name)
}

// viewRead opens and reads a file through the view, bounded in time and
// size; it reports what it got.
func viewRead(p string, limit int64) ([]byte, error) {
	type res struct {
		b   []byte
		err error
	}
	ch := make(chan res, 1)
	go func() {
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if err != nil {
			ch <- res{nil, err}
			return
		}
		f := os.NewFile(uintptr(fd), p)
		defer f.Close()
		b, err := io.ReadAll(io.LimitReader(f, limit))
		if errors.Is(err, syscall.EAGAIN) {
			err = nil
		}
		ch <- res{b, err}
	}()
	select {
	case r := <-ch:
		return r.b, r.err
	case <-time.After(hostileOpTimeout):
		return nil, fmt.Errorf("%s: blocked", p)
	}
}

// waitQuiet waits (bounded) until no conversion runs in vm: after a call
// that hit the time bound the daemon may still be converting it, which
// would slow the next cases down.
func waitQuiet(t *testing.T, vm string) {
	t.Helper()
	for deadline := time.Now().Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		busy := false
		ents, _ := os.ReadDir(vm)
		for _, e := range ents {
			busy = busy || strings.Contains(e.Name(), ".vmcryptd-tmp")
		}
		if !busy {
			return
		}
	}
	t.Errorf("%s: a conversion still runs after 3 minutes", vm)
}

func mkSocket(t *testing.T, p string) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
}

func replaceWith(t *testing.T, p string, make func(string) error) {
	t.Helper()
	os.Remove(p)
	if err := make(p); err != nil {
		t.Fatalf("%s: %v", p, err)
	}
}

func fifoAt(p string) error    { return unix.Mkfifo(p, 0o600) }
func zeroDevAt(p string) error { return unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 5))) }

// patchSparse rewrites little-endian header fields of the sparse extent p.
func patchSparse(t *testing.T, p string, fields map[int]uint64, width map[int]int) {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	for off, v := range fields {
		if width[off] == 4 {
			binary.LittleEndian.PutUint32(b[off:], uint32(v))
		} else {
			binary.LittleEndian.PutUint64(b[off:], v)
		}
	}
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// hostileCase is one hostile VM directory: a plain VM h (see hostileVM)
// changed by mutate, after encrypting it when encryptFirst. file is the
// name a refusal must mention.
type hostileCase struct {
	name         string
	file         string
	encryptFirst bool
	sparse       bool // the disk is a monolithicSparse made by qemu-img
	last         bool // do not wait for a conversion left running
	// convBound, when set, bounds vm encrypt and decrypt instead of
	// hostileOpTimeout: converting thousands of files is slow, not stuck.
	convBound time.Duration
	mutate    func(t *testing.T, dir, outside string)
}

func (c hostileCase) conversionBound() time.Duration {
	if c.convBound > 0 {
		return c.convBound
	}
	return hostileOpTimeout
}

func hostileCases() []hostileCase {
	truncate := func(name string) func(*testing.T, string, string) {
		return func(t *testing.T, dir, _ string) {
			if err := os.Truncate(filepath.Join(dir, name), 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	with := func(name string, make func(string) error) func(*testing.T, string, string) {
		return func(t *testing.T, dir, _ string) { replaceWith(t, filepath.Join(dir, name), make) }
	}
	socket := func(name string) func(*testing.T, string, string) {
		return func(t *testing.T, dir, _ string) {
			os.Remove(filepath.Join(dir, name))
			mkSocket(t, filepath.Join(dir, name))
		}
	}
	// out moves the file out of the datastore and leaves a symlink (or a
	// hard link) to it in its place.
	out := func(name string, hard bool) func(*testing.T, string, string) {
		return func(t *testing.T, dir, outside string) {
			dst := filepath.Join(outside, name)
			if err := os.Rename(filepath.Join(dir, name), dst); err != nil {
				t.Fatal(err)
			}
			link := os.Symlink
			if hard {
				link = os.Link
			}
			if err := link(dst, filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	addFile := func(name string, content []byte) func(*testing.T, string, string) {
		return func(t *testing.T, dir, _ string) {
			if err := os.WriteFile(filepath.Join(dir, name), content, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	sparseField := func(off, w int, v uint64) func(*testing.T, string, string) {
		return func(t *testing.T, dir, _ string) {
			patchSparse(t, filepath.Join(dir, "h.vmdk"), map[int]uint64{off: v}, map[int]int{off: w})
		}
	}
	return []hostileCase{
		{name: "zero vmx", file: "h.vmx", mutate: truncate("h.vmx")},
		{name: "zero descriptor", file: "h.vmdk", mutate: truncate("h.vmdk")},
		{name: "zero extent", file: "h-flat.vmdk", mutate: truncate("h-flat.vmdk")},
		{name: "zero nvram", file: "h.nvram", mutate: truncate("h.nvram")},
		{name: "zero vmsd", file: "h.vmsd", mutate: addFile("h.vmsd", nil)},
		{name: "fifo descriptor", file: "h.vmdk", mutate: with("h.vmdk", fifoAt)},
		{name: "fifo extent", file: "h-flat.vmdk", mutate: with("h-flat.vmdk", fifoAt)},
		{name: "fifo nvram", file: "h.nvram", mutate: with("h.nvram", fifoAt)},
		{name: "fifo vmsd", file: "h.vmsd", mutate: with("h.vmsd", fifoAt)},
		{name: "fifo journal", file: vm.JournalName, mutate: with(vm.JournalName, fifoAt)},
		{name: "socket extent", file: "h-flat.vmdk", mutate: socket("h-flat.vmdk")},
		{name: "socket nvram", file: "h.nvram", mutate: socket("h.nvram")},
		{name: "device extent", file: "h-flat.vmdk", mutate: with("h-flat.vmdk", zeroDevAt)},
		{name: "device descriptor", file: "h.vmdk", mutate: with("h.vmdk", zeroDevAt)},
		{name: "symlink extent out", file: "h-flat.vmdk", mutate: out("h-flat.vmdk", false)},
		{name: "symlink descriptor out", file: "h.vmdk", mutate: out("h.vmdk", false)},
		{name: "symlink nvram out", file: "h.nvram", mutate: out("h.nvram", false)},
		{name: "hardlink extent out", file: "h-flat.vmdk", mutate: out("h-flat.vmdk", true)},
		{name: "hardlink nvram out", file: "h.nvram", mutate: out("h.nvram", true)},
		{name: "symlink loop extent", file: "h-flat.vmdk", mutate: func(t *testing.T, dir, _ string) {
			os.Remove(filepath.Join(dir, "h-flat.vmdk"))
			if err := os.Symlink("h-flat.vmdk", filepath.Join(dir, "h-flat.vmdk")); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "directory loop", file: "h.vmdk", mutate: func(t *testing.T, dir, _ string) {
			if err := os.Symlink(".", filepath.Join(dir, "up")); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "h.vmdk"), []byte(flatDescriptor("h", []string{"up/up/up/h-flat.vmdk"}, 2048)), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "parent loop", file: "h.vmdk", mutate: func(t *testing.T, dir, _ string) {
			loop := func(self, parent string) string {
				d := flatDescriptor(self, []string{"h-flat.vmdk"}, 2048)
				d = strings.Replace(d, "parentCID=ffffffff", "parentCID=12345678\nparentFileNameHint=\""+parent+"\"", 1)
				return strings.Replace(d, "monolithicFlat", "vmfsSparse", 1)
			}
			os.WriteFile(filepath.Join(dir, "h.vmdk"), []byte(loop("h.vmdk", "p.vmdk")), 0o600)
			os.WriteFile(filepath.Join(dir, "p.vmdk"), []byte(loop("p.vmdk", "h.vmdk")), 0o600)
		}},
		{name: "vmx of 100k lines", file: "h.vmx", mutate: func(t *testing.T, dir, _ string) {
			f, err := os.OpenFile(filepath.Join(dir, "h.vmx"), os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			var b bytes.Buffer
			for i := 0; i < 100000; i++ {
				fmt.Fprintf(&b, "hostile.line%d = \"%d\"\n", i, i)
			}
			if _, err := f.Write(b.Bytes()); err != nil {
				t.Fatal(err)
			}
		}},
		// SparseExtentHeader fields: capacity at 12, grainSize at 20,
		// descriptorSize at 36, numGTEsPerGT at 44, gdOffset at 56.
		{name: "sparse capacity 2^62 sectors", file: "h.vmdk", sparse: true, mutate: sparseField(12, 8, 1<<62)},
		{name: "sparse grain size 2^40", file: "h.vmdk", sparse: true, mutate: sparseField(20, 8, 1<<40)},
		{name: "sparse descriptor size 2^40", file: "h.vmdk", sparse: true, mutate: sparseField(36, 8, 1<<40)},
		{name: "sparse 2^32-1 GTEs per GT", file: "h.vmdk", sparse: true, mutate: sparseField(44, 4, 1<<32-1)},
		{name: "sparse grain directory past the end", file: "h.vmdk", sparse: true, mutate: sparseField(56, 8, 1<<50)},
		{name: "encrypted, fifo extent", file: "h-flat.vmdk", encryptFirst: true, mutate: with("h-flat.vmdk", fifoAt)},
		{name: "encrypted, fifo nvram", file: "h.nvram", encryptFirst: true, mutate: with("h.nvram", fifoAt)},
		{name: "encrypted, socket nvram", file: "h.nvram", encryptFirst: true, mutate: socket("h.nvram")},
		{name: "encrypted, fifo descriptor", file: "h.vmdk", encryptFirst: true, mutate: with("h.vmdk", fifoAt)},
		{name: "encrypted, symlink nvram out", file: "h.nvram", encryptFirst: true, mutate: out("h.nvram", false)},
		{name: "encrypted, zero extent", file: "h-flat.vmdk", encryptFirst: true, mutate: truncate("h-flat.vmdk")},
		// Last: converting 10,000 extent files (one container, fsync and
		// rename each) takes 10-40 s on this machine (race detector on).
		{name: "descriptor of 10000 extents", file: "h.vmdk", last: true, convBound: 2 * time.Minute, mutate: func(t *testing.T, dir, _ string) {
			var names []string
			for i := 0; i < 10000; i++ {
				n := fmt.Sprintf("h-f%05d.vmdk", i)
				names = append(names, n)
				if err := os.WriteFile(filepath.Join(dir, n), []byte{byte(i)}, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			os.Remove(filepath.Join(dir, "h-flat.vmdk"))
			if err := os.WriteFile(filepath.Join(dir, "h.vmdk"), []byte(flatDescriptor("h", names, 1)), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	}
}

// TestHostileFiles is the hostile-file suite of issue 12: VM directories
// holding zero-byte files in every role, FIFOs, sockets, devices,
// symlinks and hard links out of the datastore, symlink and parent loops,
// a 100k-line vmx, a 10,000-extent descriptor and absurd sparse headers.
// Against each: vm status, vm encrypt, vm decrypt, reads through a
// mounted view and inspect. Every call ends within a bound, in a one-line
// error naming the file (and nothing changed) or in a byte-identical
// round trip, and the daemon answers status throughout.
func TestHostileFiles(t *testing.T) {
	needView(t)
	dir := startLab(t)
	sock := filepath.Join(dir, "vmcryptd.sock")
	ds := filepath.Join(dir, "datastore")
	// The datastore is a tmpfs (fsyncs cost nothing: the 10,000-extent
	// conversion stays in budget), bind-mounted from hfs/ds so that files
	// "outside the datastore" (hfs/outside) are on the same mount and can
	// be hard-linked into it. Cases change files through hfs.
	hfs := filepath.Join(dir, "hfs")
	if err := os.Mkdir(hfs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", hfs, "tmpfs", 0, "size=512m"); err != nil {
		t.Fatalf("mount tmpfs on %s: %v", hfs, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(hfs, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", hfs, err)
		}
	})
	for _, d := range []string{"ds", "outside"} {
		if err := os.Mkdir(filepath.Join(hfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount(filepath.Join(hfs, "ds"), ds, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s: %v", ds, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(ds, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", ds, err)
		}
	})
	mp := filepath.Join(dir, "view")
	mustRun(t, "--socket", sock, "mount", "lab", mp)
	t.Cleanup(func() { vmcryptd(t, nil, nil, "--socket", sock, "unmount", "--force", mp) })
	poller := pollStatus(sock)
	defer poller.finish(t)

	var summary []string
	for i, c := range hostileCases() {
		vmName := fmt.Sprintf("h%02d", i)
		vm := filepath.Join(ds, vmName)
		vmH := filepath.Join(hfs, "ds", vmName) // the same directory, for mutate
		outside := filepath.Join(hfs, "outside", vmName)
		var problems []string
		fail := func(format string, args ...any) {
			problems = append(problems, fmt.Sprintf(format, args...))
		}
		start := time.Now()
		t.Run(c.name, func(t *testing.T) {
			hostileVM(t, vm)
			if c.sparse {
				os.Remove(filepath.Join(vm, "h.vmdk"))
				os.Remove(filepath.Join(vm, "h-flat.vmdk"))
				runCmd(t, vm, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", "h.vmdk", "8M")
				runCmd(t, vm, "qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 1M 64k", "h.vmdk")
			}
			plain := snapshotTree(t, vm)
			if c.encryptFirst {
				mustRun(t, "--socket", sock, "vm", "encrypt", vm)
			}
			if err := os.Mkdir(outside, 0o755); err != nil {
				t.Fatal(err)
			}
			c.mutate(t, vmH, outside)
			before := snapshotTree(t, vm)

			// vm status: an answer, or one line naming the file.
			if r := runBounded(t, "--socket", sock, "vm", "status", vm); r.code != 0 && !oneLineNaming(r.err, c.file) {
				fail("vm status: exit %d: %q", r.code, r.err)
			}
			encrypted := c.encryptFirst
			if !c.encryptFirst {
				r := runBoundedFor(t, c.conversionBound(), "--socket", sock, "vm", "encrypt", vm)
				switch {
				case r.code == 0:
					encrypted = true
				case !oneLineNaming(r.err, c.file):
					fail("vm encrypt: exit %d: %q", r.code, r.err)
				}
				if r.code != 0 {
					if d := diffTrees(before, snapshotTree(t, vm)); len(d) > 0 {
						fail("vm encrypt failed but changed %v", d)
					}
				}
			}
			// The view: list the VM, read every file (bounded). A
			// container served decrypted must give the bytes it had
			// before it was encrypted.
			ref := before
			if c.encryptFirst {
				ref = plain
			}
			viewDir := filepath.Join(mp, vmName)
			if ents, err := os.ReadDir(viewDir); err != nil {
				fail("view: list: %v", err)
			} else {
				for i, e := range ents {
					if i == 64 {
						break // enough of a 10,000-extent directory
					}
					b, err := viewRead(filepath.Join(viewDir, e.Name()), 64<<20)
					if err != nil && strings.HasSuffix(err.Error(), "blocked") {
						fail("view: %v", err)
						continue
					}
					if orig, ok := ref[e.Name()]; ok && err == nil && encrypted && strings.HasPrefix(orig, "file:") {
						rest, rerr := safeopen.ReadFile(filepath.Join(vm, e.Name()), 64<<20)
						if rerr == nil && bytes.HasPrefix(rest, []byte(container.ContainerMagic)) && string(b) != orig[5:] {
							fail("view: %s: decrypted bytes differ from the original", e.Name())
						}
					}
				}
			}
			// inspect, of the directory and of the file itself.
			for _, p := range []string{vm, filepath.Join(vm, c.file)} {
				if _, err := os.Lstat(p); err != nil {
					continue
				}
				if r := runBounded(t, "inspect", p); r.code != 0 && !oneLineNaming(r.err, c.file) {
					fail("inspect %s: exit %d: %q", filepath.Base(p), r.code, r.err)
				}
			}
			// vm decrypt: back to the plain VM byte for byte, or one line
			// naming the file and nothing changed.
			if encrypted {
				mid := snapshotTree(t, vm)
				r := runBoundedFor(t, c.conversionBound(), "--socket", sock, "vm", "decrypt", vm)
				after := snapshotTree(t, vm)
				switch {
				case r.code == 0 && c.encryptFirst:
					// The mutated file is the hostile one; everything else
					// must be the original plain bytes.
					for name, v := range plain {
						if name != c.file && after[name] != v && !strings.HasPrefix(before[name], "type:") {
							fail("vm decrypt: %s is not the original after decrypt", name)
						}
					}
				case r.code == 0:
					if d := diffTrees(before, after); len(d) > 0 {
						fail("round trip: %v", d)
					}
				default:
					if !oneLineNaming(r.err, c.file) {
						fail("vm decrypt: exit %d: %q", r.code, r.err)
					}
					if d := diffTrees(mid, after); len(d) > 0 {
						fail("vm decrypt failed but changed %v", d)
					}
				}
			} else if r := runBoundedFor(t, c.conversionBound(), "--socket", sock, "vm", "decrypt", vm); r.code != 0 && !oneLineNaming(r.err, c.file) && !strings.Contains(r.err, "not encrypted") {
				fail("vm decrypt (plain VM): exit %d: %q", r.code, r.err)
			}
			for _, p := range problems {
				t.Error(p)
			}
			if !c.last {
				waitQuiet(t, vm)
			}
		})
		state := "ok"
		if len(problems) > 0 {
			state = "FAIL: " + strings.Join(problems, "; ")
		}
		summary = append(summary, fmt.Sprintf("%-40s %6s  %s", c.name, time.Since(start).Round(100*time.Millisecond), state))
	}
	t.Logf("hostile-file suite:\n%s", strings.Join(summary, "\n"))

	// A file the kernel knows as regular (cached for the entry timeout)
	// replaced by a FIFO at rest: the open reaches the daemon, which must
	// refuse it at once instead of blocking on the FIFO.
	t.Run("fifo swapped under a cached view file", func(t *testing.T) {
		for _, enc := range []bool{false, true} {
			vm := filepath.Join(ds, fmt.Sprintf("swap%v", enc))
			hostileVM(t, vm)
			if enc {
				mustRun(t, "--socket", sock, "vm", "encrypt", vm)
			}
			for _, name := range []string{"h.nvram", "h-flat.vmdk"} {
				vp := filepath.Join(mp, filepath.Base(vm), name)
				if _, err := os.Stat(vp); err != nil {
					t.Fatal(err)
				}
				replaceWith(t, filepath.Join(vm, name), fifoAt)
				start := time.Now()
				_, err := viewRead(vp, 1<<20)
				if err == nil || strings.HasSuffix(err.Error(), "blocked") || !errors.Is(err, syscall.EIO) {
					t.Errorf("encrypted=%v %s: open through the view after the swap: %v, want EIO", enc, name, err)
				}
				if d := time.Since(start); d > 2*time.Second {
					t.Errorf("encrypted=%v %s: refusal took %s", enc, name, d)
				}
			}
		}
	})
}

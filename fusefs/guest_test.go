package fusefs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// TestQemuGuestBoot boots a real QEMU guest (TCG: no KVM here) on a VMDK
// made through the view, with the drive options QEMU's fast paths use:
// cache=none (O_DIRECT on the view) with aio=native (libaio) and with
// aio=io_uring. A busybox initramfs writes 4 MiB of random data to
// /dev/vda with O_DIRECT, drops its caches, reads it back and prints its
// MD5; the host checks the guest's verdict, reads the same range through
// the view and finds the same MD5, and finds a container at rest.
//
// Opt-in (a boot takes 5-20 s under TCG): VMCRYPTD_GUEST=1, or `make
// guest`, which installs qemu-system-x86, busybox-static and
// linux-image-cloud-amd64 first.
func TestQemuGuestBoot(t *testing.T) {
	if os.Getenv("VMCRYPTD_GUEST") != "1" {
		t.Skip("opt-in: VMCRYPTD_GUEST=1 (make guest)")
	}
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img", "busybox"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed (scripts/install-deps.sh guest)", tool)
		}
	}
	kernel, modDir := guestKernel(t)
	initrd := filepath.Join(t.TempDir(), "initrd.cpio")
	buildInitramfs(t, initrd, modDir)

	m := mountTest(t, Options{})
	vmdk := m.view("enc/guest.vmdk")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", vmdk, "16M")
	for _, aio := range []string{"native", "io_uring"} {
		t.Run("aio="+aio, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			start := time.Now()
			cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
				"-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
				"-kernel", kernel, "-initrd", initrd,
				"-append", "console=ttyS0 panic=-1 quiet",
				"-drive", "file="+vmdk+",format=vmdk,if=virtio,cache=none,aio="+aio)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("qemu: %v\n%s\nview log:\n%s", err, tail(out), m.logs.String())
			}
			mm := regexp.MustCompile(`VMCRYPTD-GUEST-OK ([0-9a-f]{32})`).FindSubmatch(out)
			if mm == nil {
				t.Fatalf("the guest did not verify its pattern:\n%s", tail(out))
			}
			// The range the guest wrote, read through the view.
			f, err := os.Open(m.view("enc/guest-flat.vmdk"))
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4<<20)
			_, err = f.ReadAt(buf, 1<<20)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			sum := md5.Sum(buf)
			if got := hex.EncodeToString(sum[:]); got != string(mm[1]) {
				t.Fatalf("the view holds MD5 %s where the guest wrote %s", got, mm[1])
			}
			t.Logf("guest booted, wrote, read back and powered off in %v (aio=%s)", time.Since(start).Round(100*time.Millisecond), aio)
		})
	}
	waitReleased(t, m.v)
	for _, name := range []string{"guest.vmdk", "guest-flat.vmdk"} {
		raw, err := os.ReadFile(m.backing("enc/" + name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(raw, []byte(container.ContainerMagic)) {
			t.Errorf("%s is not a container at rest", name)
		}
	}
}

func tail(b []byte) string {
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// guestKernel finds an installed Debian kernel and its modules directory.
func guestKernel(t *testing.T) (kernel, modDir string) {
	t.Helper()
	ks, _ := filepath.Glob("/boot/vmlinuz-*")
	sort.Strings(ks)
	for i := len(ks) - 1; i >= 0; i-- {
		ver := strings.TrimPrefix(filepath.Base(ks[i]), "vmlinuz-")
		if _, err := os.Stat(filepath.Join("/lib/modules", ver, "modules.dep")); err == nil {
			return ks[i], filepath.Join("/lib/modules", ver)
		}
	}
	t.Fatal("no /boot/vmlinuz-* with /lib/modules (apt-get install linux-image-cloud-amd64)")
	return "", ""
}

// guestModules lists the modules virtio_pci and virtio_blk need, each
// after its dependencies (modules.dep), as paths below modDir.
func guestModules(t *testing.T, modDir string) []string {
	t.Helper()
	f, err := os.Open(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	deps := map[string][]string{}
	byName := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		mod, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
		byName[strings.TrimSuffix(filepath.Base(mod), ".ko")] = mod
	}
	var order []string
	seen := map[string]bool{}
	var visit func(m string)
	visit = func(m string) {
		if seen[m] {
			return
		}
		seen[m] = true
		for _, d := range deps[m] {
			visit(d)
		}
		order = append(order, m)
	}
	for _, name := range []string{"virtio_pci", "virtio_blk"} {
		mod, ok := byName[name]
		if !ok {
			// Built into the kernel: nothing to load.
			continue
		}
		if strings.HasSuffix(mod, ".xz") || strings.HasSuffix(mod, ".zst") || strings.HasSuffix(mod, ".gz") {
			t.Fatalf("%s is compressed; busybox insmod needs plain .ko files", mod)
		}
		visit(mod)
	}
	return order
}

const guestInit = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /modules.order); do /bin/busybox insmod /$m || echo "insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
bb=/bin/busybox
$bb dd if=/dev/urandom of=/tmp/pat bs=64k count=64 2>/dev/null
$bb dd if=/tmp/pat of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null || echo "guest write failed"
echo 3 > /proc/sys/vm/drop_caches
$bb dd if=/dev/vda of=/tmp/back bs=64k skip=16 count=64 iflag=direct 2>/dev/null || echo "guest read failed"
if $bb cmp /tmp/pat /tmp/back; then
	echo "VMCRYPTD-GUEST-OK $($bb md5sum /tmp/pat | $bb cut -d' ' -f1)"
else
	echo "VMCRYPTD-GUEST-BAD"
fi
$bb poweroff -f
`

// buildInitramfs writes a newc cpio archive with busybox, the init script
// and the virtio modules.
func buildInitramfs(t *testing.T, out, modDir string) {
	t.Helper()
	bbPath, _ := exec.LookPath("busybox")
	bb, err := os.ReadFile(bbPath)
	if err != nil {
		t.Fatal(err)
	}
	var w cpioWriter
	w.dir("bin")
	w.file("bin/busybox", 0o755, bb)
	w.file("init", 0o755, []byte(guestInit))
	mods := guestModules(t, modDir)
	made := map[string]bool{}
	for _, m := range mods {
		data, err := os.ReadFile(filepath.Join(modDir, m))
		if err != nil {
			t.Fatal(err)
		}
		parts := strings.Split(filepath.Dir(m), "/")
		for i := range parts {
			d := strings.Join(parts[:i+1], "/")
			if !made[d] {
				w.dir(d)
				made[d] = true
			}
		}
		w.file(m, 0o644, data)
	}
	w.file("modules.order", 0o644, []byte(strings.Join(mods, "\n")+"\n"))
	if err := os.WriteFile(out, w.finish(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// cpioWriter writes the "newc" cpio format the kernel unpacks as an
// initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
type cpioWriter struct {
	buf bytes.Buffer
	ino int
}

func (w *cpioWriter) entry(name string, mode uint32, data []byte) {
	w.ino++
	nlink := 1
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	fmt.Fprintf(&w.buf, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		w.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
	w.buf.Write(data)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

func (w *cpioWriter) dir(name string)                            { w.entry(name, 0o040755, nil) }
func (w *cpioWriter) file(name string, perm uint32, data []byte) { w.entry(name, 0o100000|perm, data) }

func (w *cpioWriter) finish() []byte {
	w.entry("TRAILER!!!", 0, nil)
	return w.buf.Bytes()
}

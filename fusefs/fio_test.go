package fusefs

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine/container"
)

// TestFioVerify runs fio with crc32c verification: four jobs of mixed
// random reads and writes on one encrypted file, with one request at a
// time (psync) and with 32 in flight per job (libaio and io_uring, which
// with asynchronous direct I/O reach the view concurrently), buffered and
// O_DIRECT. The jobs start 2 KiB off the 4 KiB data-unit grid, so every
// block straddles two units (read-modify-write) and neighbouring jobs
// share the units at their boundaries.
func TestFioVerify(t *testing.T) {
	requireTool(t, "fio")
	m := mountTest(t, Options{})
	cases := []struct {
		name   string
		engine string
		depth  int
		direct int
	}{
		{"psync-buffered", "psync", 1, 0},
		{"psync-direct", "psync", 1, 1},
		{"libaio-qd32-direct", "libaio", 32, 1},
		{"io_uring-qd32-direct", "io_uring", 32, 1},
		{"io_uring-qd32-buffered", "io_uring", 32, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			file := m.view("enc/fio-" + tc.name + ".bin")
			out := m.backing("fio-" + tc.name + ".json")
			args := []string{
				"--name=verify", "--filename=" + file,
				"--size=8M", "--offset=2k", "--offset_increment=8M", "--numjobs=4",
				"--rw=randrw", "--rwmixread=50", "--bs=4k", "--ioengine=" + tc.engine,
				fmt.Sprintf("--iodepth=%d", tc.depth), fmt.Sprintf("--direct=%d", tc.direct),
				"--verify=crc32c", "--verify_fatal=1", "--verify_backlog=256",
				"--verify_state_save=0",
				"--group_reporting", "--output-format=json", "--output=" + out,
			}
			cmd := exec.Command("fio", args...)
			cmd.Dir = m.root
			if b, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("fio: %v\n%s\nview log:\n%s", err, b, m.logs.String())
			}
			raw, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			s := string(raw)
			var res struct {
				Jobs []struct {
					Error int `json:"error"`
					Read  struct {
						IOBytes int64 `json:"io_bytes"`
					} `json:"read"`
					Write struct {
						IOBytes int64 `json:"io_bytes"`
					} `json:"write"`
				} `json:"jobs"`
			}
			if err := json.Unmarshal([]byte(s[strings.Index(s, "{"):]), &res); err != nil {
				t.Fatal(err)
			}
			if len(res.Jobs) != 1 || res.Jobs[0].Error != 0 {
				t.Fatalf("fio reported errors: %s", s)
			}
			j := res.Jobs[0]
			if j.Write.IOBytes < 12<<20 || j.Read.IOBytes < 12<<20 {
				t.Fatalf("fio did too little: read %d, wrote %d bytes", j.Read.IOBytes, j.Write.IOBytes)
			}
			t.Logf("fio: read %d MiB (with verification), wrote %d MiB", j.Read.IOBytes>>20, j.Write.IOBytes>>20)
		})
	}
	waitReleased(t, m.v)
	for _, tc := range cases {
		rel := "enc/fio-" + tc.name + ".bin"
		c, err := container.OpenContainer(m.backing(rel), m.b.dek, true, "")
		if err != nil {
			t.Fatalf("%s at rest: %v", rel, err)
		}
		if want := int64(2048 + 32<<20); c.Size() != want {
			t.Errorf("%s: logical size %d, want %d", rel, c.Size(), want)
		}
		c.Close()
	}
}

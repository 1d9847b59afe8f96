package fusefs

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vmcryptd/vmcryptd/engine"
)

// TestFioVerify runs fio with crc32c verification: four jobs of mixed
// random reads and writes on one encrypted file, buffered and O_DIRECT.
// The jobs start 2 KiB off the 4 KiB data-unit grid, so every block
// straddles two units (read-modify-write) and neighbouring jobs share the
// units at their boundaries.
func TestFioVerify(t *testing.T) {
	requireTool(t, "fio")
	m := mountTest(t, Options{})
	for _, direct := range []int{0, 1} {
		t.Run(fmt.Sprintf("direct=%d", direct), func(t *testing.T) {
			file := m.view(fmt.Sprintf("enc/fio-%d.bin", direct))
			out := m.backing(fmt.Sprintf("fio-%d.json", direct))
			args := []string{
				"--name=verify", "--filename=" + file,
				"--size=16M", "--offset=2k", "--offset_increment=16M", "--numjobs=4",
				"--rw=randrw", "--rwmixread=50", "--bs=4k", "--ioengine=psync",
				fmt.Sprintf("--direct=%d", direct),
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
			if j.Write.IOBytes < 16<<20 || j.Read.IOBytes < 16<<20 {
				t.Fatalf("fio did too little: read %d, wrote %d bytes", j.Read.IOBytes, j.Write.IOBytes)
			}
			t.Logf("fio: read %d MiB (with verification), wrote %d MiB", j.Read.IOBytes>>20, j.Write.IOBytes>>20)
		})
	}
	waitReleased(t, m.v)
	for _, direct := range []int{0, 1} {
		rel := fmt.Sprintf("enc/fio-%d.bin", direct)
		c, err := engine.OpenContainer(m.backing(rel), m.b.dek, true, "")
		if err != nil {
			t.Fatalf("%s at rest: %v", rel, err)
		}
		if want := int64(2048 + 64<<20); c.Size() != want {
			t.Errorf("%s: logical size %d, want %d", rel, c.Size(), want)
		}
		c.Close()
	}
}

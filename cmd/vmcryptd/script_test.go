package main

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"
)

// TestScripts runs the CLI transcripts in testdata/script: usage and
// help, error lines and exit codes, and --json output against a real lab
// daemon. Each script runs in its own $WORK; `exits N args...` runs
// vmcryptd and checks its exit code N (stdout and stderr are then
// checked with the usual stdout/stderr commands); `labup DIR` brings a
// lab up in DIR and takes it down when the script ends, pass or fail;
// `flipbyte FILE OFFSET` inverts one byte of FILE.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir: "testdata/script",
		Setup: func(e *testscript.Env) error {
			e.Setenv("VMCRYPTD_SOCKET", e.WorkDir+"/none.sock")
			e.Setenv("CI", os.Getenv("CI"))
			if os.Geteuid() == 0 {
				e.Setenv("ROOT", "1")
			}
			return nil
		},
		Condition: func(cond string) (bool, error) {
			switch cond {
			case "root":
				return os.Geteuid() == 0, nil
			}
			return false, errors.New("unknown condition " + cond)
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"labup": func(ts *testscript.TestScript, neg bool, args []string) {
				if neg || len(args) != 1 {
					ts.Fatalf("usage: labup DIR")
				}
				dir := ts.MkAbs(args[0])
				// The "vmcryptd" the scripts run is this test binary
				// under that name (testscript.Main), found on $PATH.
				ts.Defer(func() { ts.Exec("vmcryptd", "lab", "down", "--dir", dir) })
				ts.Check(ts.Exec("vmcryptd", "lab", "up", "--dir", dir))
			},
			"flipbyte": func(ts *testscript.TestScript, neg bool, args []string) {
				if neg || len(args) != 2 {
					ts.Fatalf("usage: flipbyte FILE OFFSET")
				}
				off, err := strconv.ParseInt(args[1], 0, 64)
				ts.Check(err)
				f, err := os.OpenFile(ts.MkAbs(args[0]), os.O_RDWR, 0)
				ts.Check(err)
				defer f.Close()
				b := make([]byte, 1)
				_, err = f.ReadAt(b, off)
				ts.Check(err)
				b[0] ^= 0xff
				_, err = f.WriteAt(b, off)
				ts.Check(err)
			},
			"exits": func(ts *testscript.TestScript, neg bool, args []string) {
				if neg || len(args) < 1 {
					ts.Fatalf("usage: exits CODE args...")
				}
				want, err := strconv.Atoi(args[0])
				if err != nil {
					ts.Fatalf("exits: bad code %q", args[0])
				}
				err = ts.Exec("vmcryptd", args[1:]...)
				got := 0
				var ee *exec.ExitError
				switch {
				case errors.As(err, &ee):
					got = ee.ExitCode()
				case err != nil:
					ts.Fatalf("exits: %v", err)
				}
				if got != want {
					ts.Fatalf("vmcryptd %v: exit code %d, want %d", args[1:], got, want)
				}
			},
		},
	})
}

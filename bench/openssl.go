package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// OpenSSLAvailable reports whether an `openssl` binary is on the PATH.
func OpenSSLAvailable() bool {
	_, err := exec.LookPath("openssl")
	return err == nil
}

// MeasureOpenSSL runs `openssl speed -evp aes-256-xts` for each unit size,
// operation and thread count and returns its figures as Results whose Impl
// is "openssl". OpenSSL measures whole seconds, so d is rounded up.
func MeasureOpenSSL(ctx context.Context, units, threads []int, d time.Duration) ([]Result, error) {
	secs := int((d + time.Second - 1) / time.Second)
	if secs < 1 {
		secs = 1
	}
	var out []Result
	for _, unit := range units {
		for _, op := range opNames {
			for _, th := range threads {
				// -elapsed: wall-clock time, as our own figures use; without
				// it openssl divides by user CPU time, which flatters it on a
				// busy machine.
				args := []string{"speed", "-elapsed", "-mr", "-seconds", strconv.Itoa(secs), "-bytes", strconv.Itoa(unit)}
				if th > 1 {
					args = append(args, "-multi", strconv.Itoa(th))
				}
				if op == "decrypt" {
					args = append(args, "-decrypt")
				}
				args = append(args, "-evp", "aes-256-xts")
				cmd := exec.CommandContext(ctx, "openssl", args...)
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				raw, err := cmd.Output()
				if err != nil {
					return nil, fmt.Errorf("openssl %s: %w: %s", strings.Join(args, " "), err, firstLine(stderr.String()))
				}
				bps, err := parseOpenSSLSpeed(raw)
				if err != nil {
					return nil, fmt.Errorf("openssl %s: %w", strings.Join(args, " "), err)
				}
				out = append(out, Result{Impl: "openssl", Op: op, Unit: unit, Threads: th, BytesPerSec: bps})
			}
		}
	}
	return out, nil
}

// parseOpenSSLSpeed reads the machine-readable (-mr) output of
// `openssl speed`. The figure is the last "+F:<n>:<name>:<bytes/s>" line
// that is not a child's report ("Got: +F..." under -multi): with -multi
// it is the parent's sum over all children.
func parseOpenSSLSpeed(raw []byte) (float64, error) {
	var last string
	sc := bufio.NewScanner(bytes.NewReader(raw))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "+F:") {
			last = line
		}
	}
	if last == "" {
		return 0, fmt.Errorf("no +F: result line in output")
	}
	fields := strings.Split(last, ":")
	v, err := strconv.ParseFloat(fields[len(fields)-1], 64)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("bad result line %q", last)
	}
	return v, nil
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

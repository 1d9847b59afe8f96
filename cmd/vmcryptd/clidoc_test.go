package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/alecthomas/kong"
)

// writeScript writes `vmcryptd completion SHELL` (run as the real CLI)
// into a temporary file.
func writeScript(t *testing.T, shell string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vmcryptd."+shell)
	if err := os.WriteFile(p, []byte(mustRun(t, "completion", shell)), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func shellOut(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = t.TempDir() // file completion must not see the repo
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("%s %v: %v\n%s", name, args, err, stderr.String())
	}
	return string(out)
}

// TestCompletionScriptsParse checks each shell accepts its script.
func TestCompletionScriptsParse(t *testing.T) {
	for _, tc := range []struct{ shell, check string }{
		{"bash", "-n"},
		{"zsh", "-n"},
		{"fish", "--no-execute"},
	} {
		t.Run(tc.shell, func(t *testing.T) {
			needBin(t, tc.shell)
			shellOut(t, tc.shell, tc.check, writeScript(t, tc.shell))
		})
	}
}

// TestCompletionCompletes drives each shell's completion code for real
// command lines: nested commands, flags after a value-taking flag,
// enumerated arguments.
func TestCompletionCompletes(t *testing.T) {
	cases := []struct {
		words []string // the last one is the word being completed
		want  []string
		not   []string
	}{
		{[]string{"vm", "enc"}, []string{"encrypt"}, []string{"decrypt"}},
		{[]string{"host", "encryption", "st"}, []string{"status"}, []string{"serve"}},
		{[]string{"--socket", "/x", "host", ""}, []string{"encryption", "join"}, nil},
		{[]string{"manager", "host", ""}, []string{"add", "list", "remove", "lock", "unlock"}, []string{"join"}},
		{[]string{"manager", "host", "add", "--"}, []string{"--csr", "--out", "--address"}, nil},
		{[]string{"manager", "policy", ""}, []string{"list", "create", "remove"}, []string{"set"}},
		{[]string{"manager", "policy", "create", "--"}, []string{"--encrypt", "--provider", "--description"}, nil},
		{[]string{"policy", "list", "--"}, []string{"--json"}, nil},
		{[]string{"vm", "encrypt", "--"}, []string{"--key-id", "--provider", "--socket"}, []string{"--deep"}},
		{[]string{"completion", ""}, []string{"bash", "fish", "zsh"}, nil},
		{[]string{""}, []string{"serve", "status", "vm", "completion"}, []string{"man", "encryption"}},
	}
	check := func(t *testing.T, got string, want, not []string) {
		t.Helper()
		words := map[string]bool{}
		for _, line := range strings.Split(got, "\n") {
			if f := strings.Fields(line); len(f) > 0 {
				words[strings.SplitN(f[0], "\t", 2)[0]] = true
			}
		}
		for _, w := range want {
			if !words[w] {
				t.Errorf("missing %q in %q", w, got)
			}
		}
		for _, w := range not {
			if words[w] {
				t.Errorf("unexpected %q in %q", w, got)
			}
		}
	}
	t.Run("bash", func(t *testing.T) {
		needBin(t, "bash")
		script := writeScript(t, "bash")
		for _, tc := range cases {
			var q []string
			for _, w := range append([]string{"vmcryptd"}, tc.words...) {
				q = append(q, "'"+w+"'")
			}
			prog := "source " + script + "; COMP_WORDS=(" + strings.Join(q, " ") + "); COMP_CWORD=" +
				itoa(len(tc.words)) + "; _vmcryptd; printf '%s\\n' \"${COMPREPLY[@]}\""
			check(t, shellOut(t, "bash", "-c", prog), tc.want, tc.not)
		}
	})
	t.Run("fish", func(t *testing.T) {
		needBin(t, "fish")
		script := writeScript(t, "fish")
		for _, tc := range cases {
			line := "vmcryptd " + strings.Join(tc.words, " ")
			check(t, shellOut(t, "fish", "-c", "source "+script+"; complete -C '"+line+"'"), tc.want, tc.not)
		}
	})
	t.Run("zsh", func(t *testing.T) {
		// zsh's completion widgets need a terminal; drive the generated
		// functions that decide what is offered.
		needBin(t, "zsh")
		script := writeScript(t, "zsh")
		for _, tc := range cases {
			before := tc.words[:len(tc.words)-1]
			cur := tc.words[len(tc.words)-1]
			var q []string
			for _, w := range before {
				q = append(q, "'"+w+"'")
			}
			fn := "_vmcryptd_cmds"
			if strings.HasPrefix(cur, "-") {
				fn = "_vmcryptd_flags"
			}
			prog := "compdef(){ :; }; source " + script + "; p=\"$(_vmcryptd_walk " + strings.Join(q, " ") + ")\"; " +
				"for w in ${=$(" + fn + " \"$p\")} ${=${$(_vmcryptd_args \"$p\")#enum:}}; do [[ $w == '" + cur + "'* ]] && print -r -- $w; done; true"
			check(t, shellOut(t, "zsh", "-c", prog), tc.want, tc.not)
		}
	})
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestManPage renders the generated page with groff (warnings on) and
// man, and checks it names every visible command and global flag.
func TestManPage(t *testing.T) {
	needBin(t, "groff")
	needBin(t, "man")
	page := filepath.Join(t.TempDir(), "vmcryptd.8")
	if err := os.WriteFile(page, []byte(mustRun(t, "man")), 0o644); err != nil {
		t.Fatal(err)
	}
	shellOut(t, "groff", "-man", "-Tutf8", "-ww", "-z", page)
	cmd := exec.Command("man", "-l", "-P", "cat", page)
	cmd.Env = append(os.Environ(), "MANWIDTH=100", "LANG=C.UTF-8")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("man -l: %v\n%s", err, stderr.String())
	}
	text := strings.Join(strings.Fields(string(out)), " ")
	k, err := kong.New(&cli{}, kongOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, leaf := range k.Model.Leaves(true) {
		path := "vmcryptd " + strings.TrimPrefix(leaf.FullPath(), "vmcryptd ")
		if !strings.Contains(text, path) {
			t.Errorf("man page does not name %q", path)
		}
		for _, f := range leaf.Flags {
			if !f.Hidden && !strings.Contains(text, "--"+f.Name) {
				t.Errorf("man page does not name %s --%s", path, f.Name)
			}
		}
		n++
	}
	if n < 20 {
		t.Fatalf("only %d commands found in the model", n)
	}
	if strings.Contains(text, "vmcryptd man ") {
		t.Error("man page lists the hidden man command")
	}
}

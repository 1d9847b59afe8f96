// Package clidoc generates shell completions (bash, zsh, fish) and a
// man page from the kong model of a command line, so neither can drift
// from --help: both are derived from the same struct tags at run time.
package clidoc

import (
	"sort"
	"strings"

	"github.com/alecthomas/kong"
)

// command is one visible command of the tree, with the flags that apply
// to it (its own and its ancestors').
type command struct {
	path     string // "vm encrypt"; "" for the application
	node     *kong.Node
	children []*kong.Node
	flags    []*kong.Flag // visible, inherited first
}

// commands walks the visible command tree depth first, the application
// first.
func commands(app *kong.Application) []command {
	var out []command
	var walk func(n *kong.Node, path string)
	walk = func(n *kong.Node, path string) {
		c := command{path: path, node: n}
		for _, ch := range n.Children {
			if !ch.Hidden && ch.Type == kong.CommandNode {
				c.children = append(c.children, ch)
			}
		}
		for _, group := range n.AllFlags(true) {
			c.flags = append(c.flags, group...)
		}
		out = append(out, c)
		for _, ch := range c.children {
			walk(ch, strings.TrimSpace(path+" "+ch.Name))
		}
	}
	walk(app.Node, "")
	return out
}

// takesValue reports whether a flag consumes the next word.
func takesValue(f *kong.Flag) bool { return !f.IsBool() && !f.IsCounter() }

// isPath reports whether a value names a file or directory.
func isPath(v *kong.Value) bool {
	if v.Tag == nil {
		return false
	}
	switch v.Tag.Type {
	case "path", "existingfile", "existingdir", "file", "filecontent":
		return true
	}
	return false
}

// enum returns a value's allowed words, sorted, or nil.
func enum(v *kong.Value) []string {
	if v.Enum == "" {
		return nil
	}
	e := v.EnumSlice()
	sort.Strings(e)
	return e
}

// flagWords are the spellings of f a user may type.
func flagWords(f *kong.Flag) []string {
	w := []string{"--" + f.Name}
	if f.Short != 0 {
		w = append(w, "-"+string(f.Short))
	}
	for _, a := range f.Aliases {
		w = append(w, "--"+a)
	}
	return w
}

// argKind says how the positional arguments of n complete: "file" when
// one names a file, "enum:w1 w2" for a fixed set of words, or "".
func argKind(n *kong.Node) string {
	for _, p := range n.Positional {
		if k := valueKind(p); k != "" {
			return k
		}
	}
	return ""
}

// oneLine squeezes help text into one line.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

package main

import (
	"fmt"

	"github.com/alecthomas/kong"

	"github.com/vmcryptd/vmcryptd/internal/clidoc"
)

type completionCmd struct {
	Shell string `arg:"" enum:"bash,zsh,fish" help:"Shell to print the completion script for (bash, zsh, fish)."`
}

func (c *completionCmd) Run(k *kong.Context) error {
	s, err := clidoc.Completion(k.Model, c.Shell)
	if err != nil {
		return err
	}
	fmt.Print(s)
	return nil
}

// manCmd prints the man page; `make install` and `make deb` run it, so
// the page is generated from the same definition as --help.
type manCmd struct{}

func (manCmd) Run(k *kong.Context) error {
	fmt.Print(manPage(k.Model))
	return nil
}

func manPage(app *kong.Application) string {
	return clidoc.Man(app, clidoc.ManPage{
		Section: "8",
		Version: version,
		Description: []string{
			"The daemon (vmcryptd serve, normally run by systemd as vmcryptd.service) is the only process that holds key encryption keys (KEKs, fetched from KMIP key servers) and plain data encryption keys; it keeps them in locked memory and answers the other commands over a unix socket, checking each caller's role.",
			"Encrypted VM files are containers in the format described in docs/FORMAT.md; a FUSE view (vmcryptd mount) shows them decrypted to QEMU and ordinary tools.",
			"Exit status is 0 on success and non-zero on any error; every error is one line on standard error naming the file or object concerned.",
		},
		Files: [][2]string{
			{"/etc/vmcryptd/vmcryptd.toml", "Daemon configuration (vmcryptd serve --config)."},
			{"/run/vmcryptd/vmcryptd.sock", "The daemon's API socket."},
			{"/var/lib/vmcryptd", "Daemon state (registered VMs, key ids; never key material)."},
			{"/var/log/vmcryptd/audit.log", "Audit log of cryptographic operations."},
		},
		SeeAlso: []string{"systemctl(1)", "qemu-img(1)", "cryptsetup(8)"},
	})
}

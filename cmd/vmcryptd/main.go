// Command vmcryptd is an ESXi-style VM encryption engine for Linux: a
// daemon holding KEKs from a KMIP key server in locked memory, the
// commands that encrypt VM files at rest, and a FUSE view that decrypts
// them for QEMU and ordinary tools.
package main

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/alecthomas/kong"
)

// cli is the whole command line. Each subcommand is a struct with a Run
// method; kong binds flags and dispatches.
type cli struct {
	LogLevel slog.Level `help:"Log level (debug, info, warn, error)." default:"info" name:"log-level"`

	Bench   benchCmd   `cmd:"" help:"Measure sector-cipher throughput of every implementation against OpenSSL."`
	Version versionCmd `cmd:"" help:"Print the version."`
}

// globals is what every Run method receives.
type globals struct {
	log *slog.Logger
}

var version = "dev" // set with -ldflags "-X main.version=..."

type versionCmd struct{}

func (versionCmd) Run(g *globals) error {
	fmt.Println("vmcryptd", version)
	return nil
}

func main() {
	var c cli
	ctx := kong.Parse(&c,
		kong.Name("vmcryptd"),
		kong.Description("ESXi-style VM encryption for Linux: KMIP key servers, AES-XTS-256 at rest, FUSE decrypted views."),
		kong.UsageOnError(),
	)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: c.LogLevel}))
	if err := ctx.Run(&globals{log: log}); err != nil {
		fmt.Fprintf(os.Stderr, "vmcryptd: %v\n", err)
		os.Exit(1)
	}
}

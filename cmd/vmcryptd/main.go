// Command vmcryptd is an ESXi-style VM encryption engine for Linux: a
// daemon holding KEKs from a KMIP key server in locked memory, the
// commands that encrypt VM files at rest, and a FUSE view that decrypts
// them for QEMU and ordinary tools.
package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/alecthomas/kong"
)

// cli is the whole command line. Each subcommand is a struct with a Run
// method; kong binds flags and dispatches.
type cli struct {
	LogLevel  slog.Level `help:"Log level (debug, info, warn, error)." default:"info" name:"log-level"`
	LogFormat string     `help:"Log format: text, json, or auto (text on a terminal, JSON otherwise, e.g. under systemd for journald)." enum:"auto,json,text" default:"auto" name:"log-format"`
	Socket    string     `help:"Daemon socket." env:"VMCRYPTD_SOCKET" default:"/run/vmcryptd/vmcryptd.sock" type:"path"`

	Serve   serveCmd   `cmd:"" help:"Run the daemon (as root)."`
	Status  statusCmd  `cmd:"" help:"Show the daemon's providers, host encryption mode and per-VM key state."`
	Host    hostCmd    `cmd:"" help:"Host settings."`
	KMS     kmsCmd     `cmd:"" name:"kms" help:"Key providers (KMIP) and the embedded lab KMS."`
	Key     keyCmd     `cmd:"" help:"Keys on a key provider."`
	Lab     labCmd     `cmd:"" help:"Start or stop a self-contained lab: embedded KMS plus daemon, or with --hosts a manager and N hosts."`
	Manager managerCmd `cmd:"" help:"The manager (vCenter's role): holds the KMS credentials, the host and VM inventory, and hands KEKs to registered hosts."`
	VM      vmCmd      `cmd:"" name:"vm" help:"Encrypt, decrypt, rekey VMs; show their encryption state."`
	Policy  policyCmd  `cmd:"" help:"Storage policies (VM Encryption Policy, Datastore Default)."`
	Disk    diskCmd    `cmd:"" help:"Add or attach virtual disks; restore a disk's lost key lines."`
	Mount   mountCmd   `cmd:"" help:"Mount a decrypted FUSE view of a datastore (needs Cryptographer.Access)."`
	Unmount unmountCmd `cmd:"" help:"Unmount a view (refused while files are open, unless --force)."`
	Export  exportCmd  `cmd:"" help:"Serve virtual disks decrypted over NBD to QEMU, qemu-img, nbdcopy (unix socket, or TCP with mutual TLS)."`
	Inspect inspectCmd `cmd:"" help:"Describe a VM file or directory (formats, sizes, keys, encrypted containers) without any key or daemon."`
	Bench   benchCmd   `cmd:"" help:"Measure sector-cipher throughput of every implementation against OpenSSL."`
	Version versionCmd `cmd:"" help:"Print the version."`

	Lock       lockCmd       `cmd:"" help:"Zero every key in the daemon now: views answer EACCES, nothing is fetched until unlock (needs Cryptographer.ManageKeys)."`
	Unlock     unlockCmd     `cmd:"" help:"Let the daemon fetch its keys again after a lock, and fetch them now (needs Cryptographer.ManageKeys)."`
	Reload     reloadCmd     `cmd:"" help:"Re-read the daemon's config file and apply it whole (roles, key providers, datastores, mounts, mount roots, key retry interval, metrics address); a file that does not load, changes what needs a restart (socket, socket group, state dir, audit log, core dump patterns) or cannot be applied is refused and nothing changes (same as SIGHUP)."`
	Completion completionCmd `cmd:"" help:"Print a shell completion script (bash, zsh or fish)."`
	Man        manCmd        `cmd:"" hidden:"" help:"Print the man page (roff), generated from this command line."`
}

// globals is what every Run method receives.
type globals struct {
	log    *slog.Logger
	socket string
}

var version = "dev" // set with -ldflags "-X main.version=..."

type versionCmd struct{}

func (versionCmd) Run(g *globals) error {
	fmt.Println("vmcryptd", version)
	return nil
}

// kongOptions are the parser options; the completion and man page tests
// build the same model from them.
func kongOptions() []kong.Option {
	return []kong.Option{
		kong.Name("vmcryptd"),
		kong.Description("ESXi-style VM encryption for Linux: KMIP key servers, AES-XTS-256 at rest, FUSE decrypted views."),
		kong.UsageOnError(),
	}
}

func main() {
	var c cli
	ctx := kong.Parse(&c, kongOptions()...)
	log := newLogger(os.Stderr, c.LogFormat, isTerminal(os.Stderr), c.LogLevel)
	if err := ctx.Run(&globals{log: log, socket: c.Socket}); err != nil {
		var code exitCode
		if !errors.As(err, &code) { // an exitCode has printed its result
			fmt.Fprintf(os.Stderr, "vmcryptd: %v\n", err)
		}
		os.Exit(exitFor(err))
	}
}

package main

import (
	"fmt"
	"math"
	"strings"

	"github.com/alecthomas/kong"

	"github.com/vmcryptd/vmcryptd/engine/vmops"
	"github.com/vmcryptd/vmcryptd/internal/api"
)

// size is a byte count written like 8G, 512M, 100K or 4096.
type size int64

func (s *size) Decode(ctx *kong.DecodeContext) error {
	var v string
	if err := ctx.Scan.PopValueInto("size", &v); err != nil {
		return err
	}
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	*s = size(n)
	return nil
}

func parseSize(v string) (int64, error) {
	mult := int64(1)
	u := strings.ToUpper(strings.TrimSuffix(strings.TrimSuffix(v, "iB"), "B"))
	switch {
	case strings.HasSuffix(u, "K"):
		mult, u = 1<<10, strings.TrimSuffix(u, "K")
	case strings.HasSuffix(u, "M"):
		mult, u = 1<<20, strings.TrimSuffix(u, "M")
	case strings.HasSuffix(u, "G"):
		mult, u = 1<<30, strings.TrimSuffix(u, "G")
	case strings.HasSuffix(u, "T"):
		mult, u = 1<<40, strings.TrimSuffix(u, "T")
	}
	var n int64
	if _, err := fmt.Sscanf(u, "%d", &n); err != nil || n <= 0 || fmt.Sprint(n) != u {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M, G or T suffix", v)
	}
	if n > math.MaxInt64/mult {
		return 0, fmt.Errorf("size %q: too large", v)
	}
	return n * mult, nil
}

type diskCmd struct {
	Add         diskAddCmd         `cmd:"" help:"Create a new disk in a VM (encrypted with its own DEK when the VM is encrypted)."`
	Attach      diskAttachCmd      `cmd:"" help:"Attach an existing disk file in the VM directory (encrypted disks are refused on plain VMs)."`
	RestoreKeys diskRestoreKeysCmd `cmd:"" help:"Write back the key lines of an encrypted VM's disk whose descriptor lost them, from the keySafe copy its extents carry (only if the disk was encrypted: a guest can write such bytes into a plain disk)."`
}

type diskRestoreKeysCmd struct {
	Dir  string `arg:"" help:"VM directory (an encrypted VM)." type:"path"`
	Disk string `arg:"" help:"The disk's descriptor (.vmdk), as vmcryptd vm status names it."`
}

func (c *diskRestoreKeysCmd) Run(g *globals) error {
	var res api.DiskReply
	if err := g.call("POST", "/disk/restore-keys", api.DiskRequest{Dir: c.Dir, Path: c.Disk}, &res); err != nil {
		return err
	}
	fmt.Printf("%s: key lines restored (disk id %s)\n", res.Name, res.DiskID)
	return nil
}

type diskAddCmd struct {
	Dir       string `arg:"" help:"VM directory." type:"path"`
	Size      size   `help:"Disk size, e.g. 8G." required:""`
	Subformat string `help:"VMDK subformat (monolithicFlat; others need qemu-img)." default:"monolithicFlat"`
}

func (c *diskAddCmd) Run(g *globals) error {
	if err := vmops.CheckDiskSize(int64(c.Size)); err != nil {
		return fmt.Errorf("--size: %w", err)
	}
	var res api.DiskReply
	if err := g.call("POST", "/disk/add", api.DiskRequest{Dir: c.Dir, Size: int64(c.Size), Subformat: c.Subformat}, &res); err != nil {
		return err
	}
	fmt.Printf("added %s (encrypted: %v)\n", res.Name, res.Encrypted)
	return nil
}

type diskAttachCmd struct {
	Dir  string `arg:"" help:"VM directory." type:"path"`
	Disk string `arg:"" help:"Disk descriptor (.vmdk) inside the VM directory."`
}

func (c *diskAttachCmd) Run(g *globals) error {
	var res api.DiskReply
	if err := g.call("POST", "/disk/attach", api.DiskRequest{Dir: c.Dir, Path: c.Disk}, &res); err != nil {
		return err
	}
	state := "plain"
	if res.Encrypted {
		state = "encrypted"
	}
	fmt.Printf("attached %s (%s)\n", res.Name, state)
	return nil
}

type vmCreateCmd struct {
	Dir     string   `arg:"" help:"New VM directory (inside a datastore)." type:"path"`
	Name    string   `help:"VM name." required:""`
	Memory  size     `help:"Memory size: whole MiB, 4M to 24T." default:"1G"`
	Disk    []string `help:"Disk as SIZE[:SUBFORMAT], e.g. 8G or 8G:monolithicSparse (repeatable); a multiple of 512 bytes, at most 62T."`
	Encrypt bool     `help:"Encrypt from the first byte."`
	Policy  string   `help:"Storage policy (\"VM Encryption Policy\" encrypts)."`
	progressOpts
}

func (c *vmCreateCmd) Run(g *globals) error {
	req := api.CreateRequest{Dir: c.Dir, Name: c.Name, Memory: int64(c.Memory), Encrypt: c.Encrypt || c.Policy == "VM Encryption Policy"}
	if err := vmops.CheckMemory(req.Memory); err != nil {
		return fmt.Errorf("--memory: %w", err)
	}
	for _, d := range c.Disk {
		s, sf, _ := strings.Cut(d, ":")
		n, err := parseSize(s)
		if err == nil {
			err = vmops.CheckDiskSize(n)
		}
		if err != nil {
			return fmt.Errorf("--disk %s: %w", d, err)
		}
		req.Disks = append(req.Disks, api.DiskSpec{Size: n, Subformat: sf})
	}
	var res api.VMStatusReply
	if err := g.call("POST", "/vm/create", req, &res); err != nil {
		return err
	}
	if c.JSON {
		return printJSON(res)
	}
	state := "plain"
	if res.Encrypted {
		state = "encrypted"
	}
	fmt.Printf("created %s (%s, %d files)\n", res.Dir, state, len(res.Files))
	return nil
}

type mountCmd struct {
	Datastore  string `arg:"" help:"Datastore name (from the config) or path."`
	Mountpoint string `arg:"" help:"Where to mount the decrypted view (outside the datastore; a dead view left there by a killed daemon is detached first)." type:"path"`
	ReadOnly   bool   `help:"Read-only view."`
	AllowOther bool   `help:"Let every local user use the view, not only root. Decrypted files keep their backing file's mode and owner, so any user whom that mode lets read a file reads its plaintext; files of encrypted VMs are made 0600, but check modes you set yourself."`
}

func (c *mountCmd) Run(g *globals) error {
	var res api.MountInfo
	if err := g.call("POST", "/mounts", api.MountRequest{Datastore: c.Datastore, Mountpoint: c.Mountpoint, ReadOnly: c.ReadOnly, AllowOther: c.AllowOther}, &res); err != nil {
		return err
	}
	fmt.Printf("%s mounted on %s\n", res.Datastore, res.Mountpoint)
	return nil
}

type unmountCmd struct {
	Mountpoint string `arg:"" help:"The view's mountpoint." type:"path"`
	Force      bool   `help:"Unmount even with files open (their users get errors); also detaches a dead view a killed daemon left behind."`
}

func (c *unmountCmd) Run(g *globals) error {
	if err := g.call("POST", "/unmount", api.UnmountRequest{Mountpoint: c.Mountpoint, Force: c.Force}, nil); err != nil {
		return err
	}
	fmt.Printf("%s unmounted\n", c.Mountpoint)
	return nil
}

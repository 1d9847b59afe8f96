package inspect

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// WriteText writes the report for people.
func (r *Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format+"\n", args...) }
	p("path:\t%s", r.Path)
	kind := r.Kind
	if r.Subformat != "" {
		kind += " (" + r.Subformat + ")"
	}
	p("kind:\t%s", kind)
	if r.Kind != KindDirectory {
		p("size:\t%s", bytesText(r.Size))
	}
	p("encrypted container:\t%s", yesNo(r.EncryptedContainer))
	if r.Container != nil {
		p("container:\t%v", r.Container)
	}
	if r.Kind == KindVMDK {
		p("virtual size:\t%s", bytesText(r.VirtualSize))
		if r.CID != "" {
			p("CID:\t%s (parent %s)", r.CID, r.ParentCID)
		}
		if r.Parent != "" {
			p("parent:\t%s", r.Parent)
		}
		if r.EmbeddedDescriptor {
			p("descriptor:\tembedded")
		}
		if s := r.Sparse; s != nil {
			p("sparse header:\tversion %d, flags %#x, grain %s, %d GTEs per GT, compression %d", s.Version, s.Flags, bytesText(s.GrainSize), s.GTEsPerGT, s.CompressAlgorithm)
		}
		keyLines(p, "encryption keys", r.EncryptionKeys)
	}
	if r.DisplayName != "" {
		p("display name:\t%s", r.DisplayName)
	}
	if r.Encrypted != nil {
		p("encrypted VM:\t%s", yesNo(*r.Encrypted))
		keyLines(p, "key safe", r.KeyIDs)
	}
	if r.VMX != "" {
		p("config:\t%s", r.VMX)
	}
	tw.Flush()

	if len(r.Extents) > 0 {
		fmt.Fprintln(w, "extents:")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  ACCESS\tTYPE\tSECTORS\tGRAIN\tALLOCATED\tENCRYPTED\tFILE")
		for _, e := range r.Extents {
			grain, alloc := "-", "-"
			if e.GrainSize > 0 {
				grain = bytesText(e.GrainSize)
			}
			if e.AllocatedBytes != nil {
				alloc = bytesText(*e.AllocatedBytes)
			}
			file := e.Path
			if file == "" {
				file = "-"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%d\t%s\t%s\t%s\t%s\n", e.Access, e.Type, e.Sectors, grain, alloc, yesNo(e.EncryptedContainer), file)
		}
		tw.Flush()
	}
	if n := r.NVRAM; n != nil {
		fmt.Fprintf(w, "nvram version %d, %d entries:\n", n.Version, len(n.Entries))
		for _, e := range n.Entries {
			fmt.Fprintf(w, "  %-12s %d bytes\n", e.Name, e.Size)
		}
		if len(n.UEFIVariables) > 0 {
			fmt.Fprintln(w, "UEFI variables:")
			tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			for _, v := range n.UEFIVariables {
				fmt.Fprintf(tw, "  %s\t%s\tattr %#x\t%d bytes\n", v.Name, v.GUID, v.Attributes, v.Size)
			}
			tw.Flush()
		}
	}
	if len(r.Disks) > 0 {
		fmt.Fprintln(w, "disks:")
		for _, d := range r.Disks {
			state := "present"
			if !d.Present {
				state = "not present"
			}
			fmt.Fprintf(w, "  %-10s %s (%s)\n", d.Device, d.FileName, state)
		}
	}
	for _, s := range r.Snapshots {
		fmt.Fprintf(w, "snapshot %s %q: %s, disks %s\n", s.UID, s.DisplayName, s.File, strings.Join(s.Disks, ", "))
	}
	if len(r.Files) > 0 {
		fmt.Fprintln(w, "files:")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, f := range r.Files {
			ref := "referenced"
			if !f.Referenced {
				ref = "unreferenced"
			}
			enc := ""
			if f.EncryptedContainer {
				enc = "encrypted"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", f.Name, f.Kind, bytesText(f.Size), ref, enc)
		}
		tw.Flush()
	}
	for _, m := range r.Missing {
		fmt.Fprintf(w, "missing: %s\n", m)
	}
	for _, warn := range r.Warnings {
		fmt.Fprintf(w, "warning: %s\n", warn)
	}
	return nil
}

func keyLines(p func(string, ...any), label string, keys []KeyRef) {
	for _, k := range keys {
		p("%s:\tprovider %s key %s (%s)", label, k.ProviderID, k.KeyID, k.MAC)
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// bytesText formats n as "64 MiB (67108864 bytes)" or "512 bytes".
func bytesText(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d bytes", n)
	}
	v, i := float64(n), 0
	for v >= unit && i < 6 {
		v /= unit
		i++
	}
	s := fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[i-1])
	s = strings.Replace(s, ".0 ", " ", 1)
	return fmt.Sprintf("%s (%d bytes)", s, n)
}

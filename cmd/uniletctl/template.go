package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/unilet-dev/unilet/api/admin"
)

func templateCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "template", Short: "VM templates on this node: create, ls, rm", Args: cobra.NoArgs}
	cmd.AddCommand(templateCreateCmd(g), templateListCmd(g), templateRemoveCmd(g))
	return cmd
}

func templateCreateCmd(g *globals) *cobra.Command {
	r := &admin.CreateTemplateRequest{}
	var mem string
	var vcpus int
	var readyAfter, wait time.Duration
	cmd := &cobra.Command{
		Use:   "create NAME --image REF (--ready-log REGEX | --ready-after DURATION)",
		Short: "boot an image once, wait until it is ready and save the VM as a template",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if r.Image == "" {
				return fmt.Errorf("--image is required")
			}
			r.Name = args[0]
			if mem != "" {
				n, err := parseMiB(mem)
				if err != nil {
					return err
				}
				r.MemoryMib = int32(n)
			}
			r.Vcpus, r.ReadyAfterMs, r.TimeoutMs = int32(vcpus), readyAfter.Milliseconds(), wait.Milliseconds()
			return withClient(g, func(ctx context.Context, c *client) error {
				limit := wait
				if limit <= 0 {
					limit = time.Minute
				}
				ctx, cancel := context.WithTimeout(ctx, limit+time.Minute)
				defer cancel()
				t, err := c.CreateTemplate(ctx, r)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "template %s saved: image %s, %d MiB RAM (%s on disk), device state %s\n", t.Name, t.ImageId,
					t.MemoryMib, human(t.DiskBytes), human(t.StateBytes))
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&r.Image, "image", "", "a pulled unikernel image (required)")
	f.StringArrayVar(&r.Args, "arg", nil, "the application's argument (repeatable; default: the image's)")
	f.StringArrayVar(&r.Env, "env", nil, "environment variable K=V (repeatable; added to the image's)")
	f.StringVar(&mem, "memory", "", "guest RAM, e.g. 128Mi (default: as a pod without limits)")
	f.IntVar(&vcpus, "vcpus", 0, "vCPUs (default 1)")
	f.StringVar(&r.ReadyLog, "ready-log", "", "ready once the console matches this regular expression")
	f.DurationVar(&readyAfter, "ready-after", 0, "ready this long after the start")
	f.DurationVar(&wait, "timeout", 0, "give up after this long (default 60s)")
	f.StringArrayVar(&r.Dns, "dns", nil, "DNS server the guest is given (repeatable, at most 2; clones keep it)")
	f.StringVar(&r.Search, "search", "", "DNS search domain the guest is given")
	f.StringVar(&r.Hostname, "hostname", "", "hostname the guest is given")
	return cmd
}

// parseMiB reads a size such as 128, 128Mi, 1Gi or 512M as MiB.
func parseMiB(s string) (int, error) {
	var n int
	var unit string
	if _, err := fmt.Sscanf(s, "%d%s", &n, &unit); err != nil && !strings.Contains(err.Error(), "EOF") {
		return 0, fmt.Errorf("size %q: want MiB or a quantity such as 128Mi", s)
	}
	switch unit {
	case "", "Mi":
	case "Gi":
		n *= 1024
	case "M":
		n = int(int64(n) * 1000 * 1000 >> 20)
	case "G":
		n = int(int64(n) * 1000 * 1000 * 1000 >> 20)
	default:
		return 0, fmt.Errorf("size %q: want MiB or a quantity such as 128Mi", s)
	}
	if n <= 0 {
		return 0, fmt.Errorf("size %q: must be positive", s)
	}
	return n, nil
}

func human(b int64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1fGiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(b)/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(b)/(1<<10))
	}
	return fmt.Sprintf("%dB", b)
}

func templateListCmd(g *globals) *cobra.Command {
	return listCmd(g, &cobra.Command{Use: "ls", Aliases: []string{"list"}, Short: "list the templates"},
		func(ctx context.Context, c *client) (*admin.ListTemplatesResponse, error) {
			return c.ListTemplates(ctx, &admin.ListTemplatesRequest{})
		}, func(out io.Writer, r *admin.ListTemplatesResponse) error {
			w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tIMAGE\tSIZE\tCREATED\tUSES\tWARM")
			for _, t := range r.Templates {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%d\n", t.Name, short(t.ImageId), human(t.DiskBytes),
					time.Unix(t.CreatedUnix, 0).UTC().Format(time.RFC3339), t.Uses, t.Warm)
			}
			return w.Flush()
		})
}

func templateRemoveCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use: "rm NAME...", Aliases: []string{"remove"}, Short: "remove templates (clones running from them go on)", Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withClient(g, func(ctx context.Context, c *client) error {
				for _, n := range args {
					cctx, cancel := timeout(ctx)
					_, err := c.RemoveTemplate(cctx, &admin.RemoveTemplateRequest{Name: n})
					cancel()
					if err != nil {
						return err
					}
					fmt.Fprintln(cmd.OutOrStdout(), n)
				}
				return nil
			})
		},
	}
}

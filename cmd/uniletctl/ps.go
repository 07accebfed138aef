package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/unilet-dev/unilet/api/admin"
)

func psCmd(g *globals) *cobra.Command {
	return listCmd(g, &cobra.Command{
		Use:   "ps",
		Short: "list this node's unikernel pods and their VMs",
		Long: `ps lists the unikernel pods of this node, one line per container VM (a pod
without containers gets one line): state (suspended = held by scale-to-zero),
pod IP, image, uptime, guest memory and vCPUs, accelerator, template and the
uid its jailed QEMU runs as.`,
	}, func(ctx context.Context, c *client) (*admin.ListPodsResponse, error) {
		return c.ListPods(ctx, &admin.ListPodsRequest{})
	}, func(w io.Writer, r *admin.ListPodsResponse) error { return psTable(w, r.GetPods(), time.Now()) })
}

// psTable writes the pods as ps's table.
func psTable(out io.Writer, pods []*admin.Pod, now time.Time) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "POD\tCONTAINER\tSTATE\tIP\tIMAGE\tUPTIME\tMEMORY\tVCPUS\tACCEL\tTEMPLATE\tJAIL UID\tID")
	for _, p := range pods {
		pod := p.GetNamespace() + "/" + p.GetName()
		ip := dash(p.GetIp())
		if len(p.GetVms()) == 0 {
			fmt.Fprintf(w, "%s\t-\tpod %s\t%s\t-\t%s\t-\t-\t-\t-\t-\t%s\n", pod, p.GetState(), ip, age(p.GetCreatedUnixNano(), now), short(p.GetId()))
		}
		for _, v := range p.GetVms() {
			state := v.GetState()
			if state == "exited" {
				state = fmt.Sprintf("exited (%s, %d)", dash(v.GetReason()), v.GetExitCode())
			}
			if p.GetState() != "ready" {
				state += ", pod " + p.GetState()
			}
			up := "-"
			if v.GetStartedUnixNano() > 0 && (v.GetState() == "running" || v.GetState() == "suspended") {
				up = age(v.GetStartedUnixNano(), now)
			}
			uid := "-"
			if v.GetJailUid() >= 0 {
				uid = fmt.Sprint(v.GetJailUid())
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%dMi\t%d\t%s\t%s\t%s\t%s\n", pod, v.GetName(), state, ip, v.GetImage(), up,
				v.GetMemoryMib(), v.GetVcpus(), dash(v.GetAccel()), dash(v.GetTemplate()), uid, short(v.GetContainerId()))
		}
	}
	return w.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func short(id string) string {
	id = strings.TrimPrefix(id, "sha256:")
	if len(id) > 13 {
		return id[:13]
	}
	return id
}

// age is a duration as kubectl shows it (5s, 3m, 2h, 4d).
func age(unixNano int64, now time.Time) string {
	d := now.Sub(time.Unix(0, unixNano))
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func inspectCmd(g *globals) *cobra.Command {
	var redact bool
	cmd := &cobra.Command{
		Use:   "inspect POD|CONTAINER",
		Short: "describe a pod or container: QEMU argv as executed, guest command line, jail, cgroup, files, shim, last exit",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(g); err != nil {
				return err
			}
			return withClient(g, func(ctx context.Context, c *client) error {
				ctx, cancel := timeout(ctx)
				defer cancel()
				r, err := c.Inspect(ctx, &admin.InspectRequest{Name: args[0], Redact: redact})
				if err != nil {
					return err
				}
				format := g.output
				if format == "table" { // a document has no table: JSON
					format = "json"
				}
				return render(cmd.OutOrStdout(), format, json.RawMessage(r.GetJson()))
			})
		},
		ValidArgsFunction: completeNames(g),
	}
	cmd.Flags().BoolVar(&redact, "redact", false, "replace environment values wherever they appear (guest command line, QEMU argv)")
	return cmd
}

// completeNames completes NAMESPACE/POD/CONTAINER names from the daemon.
func completeNames(g *globals) func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
	return func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
		if len(args) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var out []string
		seen := map[string]bool{}
		add := func(n string) {
			if !seen[n] {
				seen[n] = true
				out = append(out, n)
			}
		}
		_ = withClient(g, func(ctx context.Context, c *client) error {
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			r, err := c.ListPods(ctx, &admin.ListPodsRequest{})
			if err != nil {
				return err
			}
			for _, p := range r.GetPods() {
				name := p.GetNamespace() + "/" + p.GetName()
				add(name)
				for _, v := range p.GetVms() {
					add(name + "/" + v.GetName())
				}
			}
			return nil
		})
		return out, cobra.ShellCompDirectiveNoFileComp
	}
}

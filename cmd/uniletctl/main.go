// Command uniletctl is unilet's operator CLI. Against a node's daemon
// (--endpoint, its CRI socket, which also serves the operator API in
// api/admin): ps, inspect, logs, console, images, diag and template. Offline:
// pack (build a kraftkit-compatible Unikraft OCI image). Output of the
// listing commands: -o table|json|yaml.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// DefaultEndpoint is the installed daemon's socket.
const DefaultEndpoint = "unix:///run/unilet/unilet.sock"

// globals are the flags every command has.
type globals struct {
	endpoint string
	output   string
}

func main() {
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "uniletctl:", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "uniletctl",
		Short: "Operate unilet, the Unikraft unikernel runtime of a Kubernetes node",
		Long: `uniletctl talks to the unilet daemon of this node (--endpoint, its CRI socket) to
show its unikernel pods and VMs, their logs and consoles, images and templates,
and to collect diagnostics. pack builds unikernel images without a daemon.

Pods and containers are named by ID, unique ID prefix, NAMESPACE/POD or
NAMESPACE/POD/CONTAINER.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.endpoint, "endpoint", DefaultEndpoint, "the unilet daemon's socket (unix:///PATH)")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format: table, json or yaml")
	_ = root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json", "yaml"}, cobra.ShellCompDirectiveNoFileComp))
	root.AddCommand(psCmd(g), inspectCmd(g), logsCmd(g), consoleCmd(g), imagesCmd(g), diagCmd(g), templateCmd(g), packCmd(),
		&cobra.Command{
			Use: "version", Short: "print uniletctl's version and the daemon's", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error { return printVersion(cmd, g) },
		})
	return root
}

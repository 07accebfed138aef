// Command unilet is the CRI daemon: kubelet (or crictl) talks CRI v1 to it on
// a unix socket; unikernel pods run as QEMU microVMs, other pods pass through
// to the upstream runtime. This file is the command line (pkg/config owns the
// configuration); daemon.go wires the parts together and serves.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/unilet-dev/unilet/pkg/config"
	"github.com/unilet-dev/unilet/pkg/version"
)

func main() {
	if err := command(os.Args[1:]).Execute(); err != nil {
		if serving {
			logrus.Error(err) // the daemon's log
		} else {
			fmt.Fprintln(os.Stderr, "unilet:", err)
		}
		os.Exit(1)
	}
}

// serving: the daemon got past its configuration (errors go to its log).
var serving bool

// command builds the command tree for args. The configuration file is read
// before the flags are bound, so a flag's default is the file's value and
// only flags given override it.
func command(args []string) *cobra.Command {
	path, explicit := configPath(args)
	cfg := config.Default()
	loadErr := cfg.Load(path, explicit)
	var showVersion bool
	root := &cobra.Command{
		Use:   "unilet",
		Short: "unilet: a CRI runtime that runs Unikraft unikernel pods as QEMU microVMs",
		Long: `unilet serves CRI on a unix socket for kubelet. Pods annotated
` + cfg.Pods.Annotation + `: ` + cfg.Pods.AnnotationValue + ` (or of RuntimeClass handler ` + cfg.Pods.RuntimeHandler + `)
run as QEMU microVMs; every other pod passes through to the upstream runtime.

Configuration: ` + config.DefaultPath + ` (or --config FILE), flags override it.
` + "`unilet config default`" + ` prints every key with its meaning.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if showVersion {
				fmt.Println("unilet", version.Version)
				return nil
			}
			if loadErr != nil {
				return loadErr
			}
			if err := cfg.Validate(); err != nil {
				return fmt.Errorf("configuration: %w", err)
			}
			serving = true
			return serve(cfg)
		},
	}
	root.SetArgs(args)
	pf := root.PersistentFlags()
	pf.String("config", config.DefaultPath, "configuration file (TOML); flags override it")
	config.Bind(pf, &cfg)
	root.Flags().BoolVar(&showVersion, "version", false, "print the version and exit")

	cfgCmd := &cobra.Command{Use: "config", Short: "print the daemon's configuration", Args: cobra.NoArgs}
	cfgCmd.AddCommand(&cobra.Command{
		Use:   "default",
		Short: "print the default configuration, every key commented; --config accepts it as it is",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			b, err := config.Default().Encode()
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(b)
			return err
		},
	}, &cobra.Command{
		Use:   "dump",
		Short: "print the effective configuration: defaults, the file, then the flags given",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if loadErr != nil {
				return loadErr
			}
			if err := cfg.Validate(); err != nil {
				return fmt.Errorf("configuration: %w", err)
			}
			b, err := cfg.Encode()
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(b)
			return err
		},
	})
	root.AddCommand(cfgCmd, &cobra.Command{
		Use: "version", Short: "print the version", Args: cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), "unilet", version.Version) },
	})
	return root
}

// configPath finds --config in args before the command line is parsed for
// real; explicit says the operator named the file (then it must exist).
func configPath(args []string) (path string, explicit bool) {
	fs := pflag.NewFlagSet("pre", pflag.ContinueOnError)
	fs.ParseErrorsAllowlist.UnknownFlags = true
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	p := fs.String("config", config.DefaultPath, "")
	fs.BoolP("help", "h", false, "")
	_ = fs.Parse(args)
	return *p, fs.Changed("config")
}

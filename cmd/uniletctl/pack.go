package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/spf13/cobra"

	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/version"
)

func packCmd() *cobra.Command {
	var opts image.PackOptions
	var labels []string
	var kconfig, push, output string
	var insecure bool
	cmd := &cobra.Command{
		Use:   "pack --kernel FILE (--push REF | --output DIR)",
		Short: "build a Unikraft OCI image (kraftkit format) and push it or write an OCI layout",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.Kernel == "" {
				return fmt.Errorf("--kernel is required")
			}
			if (push == "") == (output == "") {
				return fmt.Errorf("give exactly one of --push REF or --output DIR")
			}
			if kconfig != "" {
				b, err := os.ReadFile(kconfig)
				if err != nil {
					return err
				}
				opts.KConfig = image.ParseKConfig(b)
			}
			opts.Version, opts.Ref, opts.Created = "uniletctl-"+version.Version, push, time.Now()
			for _, l := range labels {
				k, v, ok := strings.Cut(l, "=")
				if !ok || k == "" {
					return fmt.Errorf("--label %q: want KEY=VALUE", l)
				}
				if opts.Labels == nil {
					opts.Labels = map[string]string{}
				}
				opts.Labels[k] = v
			}
			idx, err := image.Pack(opts)
			if err != nil {
				return err
			}
			d, err := idx.Digest()
			if err != nil {
				return err
			}
			if output != "" {
				if _, err := layout.Write(output, idx); err != nil {
					return fmt.Errorf("write OCI layout: %w", err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "wrote %s (%s)\n", output, d)
				return nil
			}
			nopts := []name.Option{name.WeakValidation}
			if insecure {
				nopts = append(nopts, name.Insecure)
			}
			ref, err := name.ParseReference(push, nopts...)
			if err != nil {
				return fmt.Errorf("invalid reference %q: %w", push, err)
			}
			if err := remote.WriteIndex(ref, idx, remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
				return fmt.Errorf("push %s: %w", push, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pushed %s@%s\n", ref.Context().Name(), d)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Kernel, "kernel", "", "kernel binary (required)")
	f.StringVar(&opts.Initrd, "initrd", "", "initrd (CPIO archive)")
	f.StringVar(&kconfig, "kconfig", "", "the build's .config; its CONFIG_* entries are recorded in os.features as kraftkit does")
	f.StringVar(&opts.KernelVersion, "kernel-version", "", "Unikraft version, recorded as org.unikraft.kernel.version")
	f.StringArrayVar(&opts.Args, "arg", nil, "default argument (repeatable; image Cmd)")
	f.StringArrayVar(&opts.Env, "env", nil, "default environment variable K=V (repeatable; image Env)")
	f.StringArrayVar(&labels, "label", nil, "image label K=V (repeatable), e.g. dev.unilet.min-memory=128 (least guest RAM in MiB)")
	f.StringVar(&push, "push", "", "push to this reference")
	f.BoolVar(&insecure, "insecure", false, "allow plain HTTP for --push")
	f.StringVar(&output, "output", "", "write an OCI image layout to this directory")
	return cmd
}

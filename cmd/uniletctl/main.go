// Command uniletctl is unilet's operator CLI: pack (build and push a
// kraftkit-compatible Unikraft OCI image), template (VM templates of the
// daemon: create, ls, rm) and version.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/unilet-dev/unilet/image"
	"github.com/unilet-dev/unilet/pkg/version"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func usage() {
	fmt.Fprintf(os.Stderr, `usage: uniletctl COMMAND [flags]

commands:
  pack      build a Unikraft OCI image (kraftkit format) and push it or write an OCI layout
  template  VM templates on this node: create NAME --image REF (--ready-log REGEX | --ready-after D), ls, rm NAME
  version   print the version
`)
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "pack":
		err = pack(os.Args[2:])
	case "template":
		err = template(os.Args[2:])
	case "version", "--version":
		fmt.Println("uniletctl", version.Version)
	case "help", "-h", "--help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "uniletctl: unknown command %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "uniletctl:", err)
		os.Exit(1)
	}
}

func pack(args []string) error {
	fs := flag.NewFlagSet("pack", flag.ContinueOnError)
	var opts image.PackOptions
	var argv, env, labels multi
	var kconfig, push, output string
	var insecure bool
	fs.StringVar(&opts.Kernel, "kernel", "", "kernel binary (required)")
	fs.StringVar(&opts.Initrd, "initrd", "", "initrd (CPIO archive)")
	fs.StringVar(&kconfig, "kconfig", "", "the build's .config; its CONFIG_* entries are recorded in os.features as kraftkit does")
	fs.StringVar(&opts.KernelVersion, "kernel-version", "", "Unikraft version, recorded as org.unikraft.kernel.version")
	fs.Var(&argv, "arg", "default argument (repeatable; image Cmd)")
	fs.Var(&env, "env", "default environment variable K=V (repeatable; image Env)")
	fs.Var(&labels, "label", "image label K=V (repeatable), e.g. dev.unilet.min-memory=128 (least guest RAM in MiB)")
	fs.StringVar(&push, "push", "", "push to this reference")
	fs.BoolVar(&insecure, "insecure", false, "allow plain HTTP for --push")
	fs.StringVar(&output, "output", "", "write an OCI image layout to this directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if opts.Kernel == "" {
		return fmt.Errorf("pack: --kernel is required")
	}
	if (push == "") == (output == "") {
		return fmt.Errorf("pack: give exactly one of --push REF or --output DIR")
	}
	if kconfig != "" {
		b, err := os.ReadFile(kconfig)
		if err != nil {
			return err
		}
		opts.KConfig = image.ParseKConfig(b)
	}
	opts.Args, opts.Env, opts.Version = argv, env, "uniletctl-"+version.Version
	opts.Ref, opts.Created = push, time.Now()
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return fmt.Errorf("pack: --label %q: want KEY=VALUE", l)
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
		fmt.Printf("wrote %s (%s)\n", output, d)
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
	fmt.Printf("pushed %s@%s\n", ref.Context().Name(), d)
	return nil
}

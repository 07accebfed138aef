package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/unilet-dev/unilet/api/admin"
)

// DefaultEndpoint is the unilet daemon's socket.
const DefaultEndpoint = "unix:///run/unilet/unilet.sock"

// dial connects to the daemon's operator API at endpoint (unix://PATH).
func dial(endpoint string) (admin.AdminClient, func(), error) {
	if !strings.HasPrefix(endpoint, "unix://") {
		return nil, nil, fmt.Errorf("endpoint %q: want unix:///path/to/unilet.sock", endpoint)
	}
	conn, err := grpc.NewClient("unix://"+strings.TrimPrefix(endpoint, "unix://"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	return admin.NewAdminClient(conn), func() { conn.Close() }, nil
}

func template(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("template: want create, ls or rm")
	}
	switch args[0] {
	case "create":
		return templateCreate(args[1:])
	case "ls", "list":
		return templateList(args[1:])
	case "rm", "remove":
		return templateRemove(args[1:])
	}
	return fmt.Errorf("template: unknown command %q (want create, ls or rm)", args[0])
}

func endpointFlag(fs *flag.FlagSet) *string {
	return fs.String("endpoint", DefaultEndpoint, "the unilet daemon's socket")
}

// parseInterspersed parses flags that may follow positional arguments.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func templateCreate(args []string) error {
	fs := flag.NewFlagSet("template create", flag.ContinueOnError)
	ep := endpointFlag(fs)
	var argv, env, dns multi
	r := &admin.CreateTemplateRequest{}
	fs.StringVar(&r.Image, "image", "", "a pulled unikernel image (required)")
	fs.Var(&argv, "arg", "the application's argument (repeatable; default: the image's)")
	fs.Var(&env, "env", "environment variable K=V (repeatable; added to the image's)")
	mem := fs.String("memory", "", "guest RAM, e.g. 128Mi (default: as a pod without limits)")
	vcpus := fs.Int("vcpus", 0, "vCPUs (default 1)")
	fs.StringVar(&r.ReadyLog, "ready-log", "", "ready once the console matches this regular expression")
	readyAfter := fs.Duration("ready-after", 0, "ready this long after the start")
	timeout := fs.Duration("timeout", 0, "give up after this long (default 60s)")
	fs.Var(&dns, "dns", "DNS server the guest is given (repeatable, at most 2; clones keep it)")
	fs.StringVar(&r.Search, "search", "", "DNS search domain the guest is given")
	fs.StringVar(&r.Hostname, "hostname", "", "hostname the guest is given")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || r.Image == "" {
		return fmt.Errorf("usage: uniletctl template create NAME --image REF (--ready-log REGEX | --ready-after DURATION) [flags]")
	}
	r.Name, r.Args, r.Env, r.Dns = pos[0], argv, env, dns
	if *mem != "" {
		n, err := parseMiB(*mem)
		if err != nil {
			return err
		}
		r.MemoryMib = int32(n)
	}
	r.Vcpus, r.ReadyAfterMs, r.TimeoutMs = int32(*vcpus), readyAfter.Milliseconds(), timeout.Milliseconds()
	c, done, err := dial(*ep)
	if err != nil {
		return err
	}
	defer done()
	wait := *timeout
	if wait <= 0 {
		wait = time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait+time.Minute)
	defer cancel()
	t, err := c.CreateTemplate(ctx, r)
	if err != nil {
		return err
	}
	fmt.Printf("template %s saved: image %s, %d MiB RAM (%s on disk), device state %s\n", t.Name, t.ImageId, t.MemoryMib,
		human(t.DiskBytes), human(t.StateBytes))
	return nil
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

func templateList(args []string) error {
	fs := flag.NewFlagSet("template ls", flag.ContinueOnError)
	ep := endpointFlag(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	c, done, err := dial(*ep)
	if err != nil {
		return err
	}
	defer done()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := c.ListTemplates(ctx, &admin.ListTemplatesRequest{})
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tIMAGE\tSIZE\tCREATED\tUSES\tWARM")
	for _, t := range r.Templates {
		id := strings.TrimPrefix(t.ImageId, "sha256:")
		if len(id) > 12 {
			id = id[:12]
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%d\n", t.Name, id, human(t.DiskBytes),
			time.Unix(t.CreatedUnix, 0).UTC().Format(time.RFC3339), t.Uses, t.Warm)
	}
	return w.Flush()
}

func templateRemove(args []string) error {
	fs := flag.NewFlagSet("template rm", flag.ContinueOnError)
	ep := endpointFlag(fs)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return fmt.Errorf("usage: uniletctl template rm NAME...")
	}
	c, done, err := dial(*ep)
	if err != nil {
		return err
	}
	defer done()
	for _, n := range pos {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := c.RemoveTemplate(ctx, &admin.RemoveTemplateRequest{Name: n})
		cancel()
		if err != nil {
			return err
		}
		fmt.Println(n)
	}
	return nil
}

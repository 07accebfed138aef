package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/spf13/cobra"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/api/admin"
	"github.com/unilet-dev/unilet/pkg/version"
)

// diagLogTail is how much of the daemon's log a bundle keeps.
const diagLogTail = 4 << 20

// diagConsoleLines is how many console lines of each VM a bundle keeps.
const diagConsoleLines = 200

func diagCmd(g *globals) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "diag --output FILE",
		Short: "collect a diagnostics bundle (.tar.gz): versions, configuration, KVM probe, daemon log, VMs, consoles, state records",
		Long: `diag writes a .tar.gz to attach to a bug report: uniletctl's and the daemon's
versions, the effective configuration, the KVM probe's verdict and QEMU's
version, the CRI status, the tail of the daemon's log, each pod and container
(inspect, with environment values redacted) with the tail of its console, the
images, and the state database's records (environment values and secrets
redacted). Nothing else of the node is read.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output == "" {
				return fmt.Errorf("--output FILE is required (e.g. --output unilet-diag.tar.gz)")
			}
			return withClient(g, func(ctx context.Context, c *client) error {
				n, err := writeDiag(ctx, c, output)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "wrote %s (%d files)\n", output, n)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&output, "output", "", "the bundle to write (.tar.gz)")
	return cmd
}

// bundle collects files for the tar; an entry that could not be had
// records why instead.
type bundle struct {
	files []diagFile
}

type diagFile struct {
	name string
	data []byte
}

func (b *bundle) add(name string, data []byte, err error) {
	if err != nil {
		name, data = name+".error", []byte(err.Error()+"\n")
	}
	b.files = append(b.files, diagFile{name, data})
}

func (b *bundle) addJSON(name string, v any, err error) {
	if err != nil {
		b.add(name, nil, err)
		return
	}
	var buf bytes.Buffer
	if rerr := render(&buf, "json", v); rerr != nil {
		b.add(name, nil, rerr)
		return
	}
	b.add(name, buf.Bytes(), nil)
}

// unsafeName keeps bundle entry names to plain characters.
var unsafeName = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

func writeDiag(ctx context.Context, c *client, output string) (int, error) {
	var b bundle
	call := func() (context.Context, context.CancelFunc) { return timeout(ctx) }

	cctx, cancel := call()
	info, err := c.Info(cctx, &admin.InfoRequest{})
	cancel()
	if err != nil {
		return 0, err // no daemon, no bundle: say so
	}
	summary := fmt.Sprintf("collected: %s\nuniletctl: %s\ndaemon: %s\naccel: %s\nKVM probe: %s\nQEMU: %s\ndaemon started: %s\ndaemon log: %s\n",
		time.Now().UTC().Format(time.RFC3339), version.Version, info.GetVersion(), info.GetAccel(), info.GetKvmProbe(), info.GetQemu(),
		time.Unix(info.GetStartedUnix(), 0).UTC().Format(time.RFC3339), dash(info.GetLogFile()))
	b.add("versions.txt", []byte(summary), nil)
	b.add("config.toml", info.GetConfig(), nil)
	cctx, cancel = call()
	st, err := c.cri.Status(cctx, &runtimeapi.StatusRequest{Verbose: true})
	cancel()
	b.addJSON("cri-status.json", st, err)
	if p := info.GetLogFile(); p != "" {
		data, err := tailFile(p, diagLogTail)
		b.add("daemon.log", data, err)
	}
	cctx, cancel = call()
	pods, err := c.ListPods(cctx, &admin.ListPodsRequest{})
	cancel()
	b.addJSON("pods.json", pods, err)
	for _, p := range pods.GetPods() {
		dir := "pods/" + unsafeName.ReplaceAllString(p.GetNamespace()+"_"+p.GetName()+"_"+short(p.GetId()), "_")
		cctx, cancel = call()
		ins, err := c.Inspect(cctx, &admin.InspectRequest{Name: p.GetId(), Redact: true})
		cancel()
		b.add(dir+"/pod.json", ins.GetJson(), err)
		for _, v := range p.GetVms() {
			base := dir + "/" + unsafeName.ReplaceAllString(fmt.Sprintf("%s_%d", v.GetName(), v.GetAttempt()), "_")
			cctx, cancel = call()
			ins, err := c.Inspect(cctx, &admin.InspectRequest{Name: v.GetContainerId(), Redact: true})
			cancel()
			b.add(base+".json", ins.GetJson(), err)
			logs, err := consoleTail(ctx, c, v.GetContainerId())
			b.add(base+".console.log", logs, err)
		}
	}
	cctx, cancel = call()
	imgs, err := c.ListUnikernelImages(cctx, &admin.ListImagesRequest{})
	cancel()
	b.addJSON("images.json", imgs, err)
	cctx, cancel = call()
	dump, err := c.DumpState(cctx, &admin.DumpStateRequest{})
	cancel()
	b.add("state.json", dump.GetJson(), err)
	return len(b.files), b.write(output)
}

// consoleTail is the last console lines of a container, as CRI log lines.
func consoleTail(ctx context.Context, c *client, id string) ([]byte, error) {
	ctx, cancel := timeout(ctx)
	defer cancel()
	s, err := c.Logs(ctx, &admin.LogsRequest{Container: id, TailLines: diagConsoleLines, Redact: true})
	if err != nil {
		return nil, err
	}
	var out []byte
	for {
		m, err := s.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, m.GetData()...)
	}
}

// tailFile reads the last n bytes of the file at p.
func tailFile(p string, n int64) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Size() > n {
		if _, err := f.Seek(-n, io.SeekEnd); err != nil {
			return nil, err
		}
	}
	return io.ReadAll(f)
}

// write writes the bundle as a .tar.gz (through a temporary file, so a
// failed run leaves no half bundle).
func (b *bundle) write(output string) error {
	tmp, err := os.CreateTemp(filepath.Dir(output), ".unilet-diag-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	gz := gzip.NewWriter(tmp)
	tw := tar.NewWriter(gz)
	now := time.Now()
	for _, f := range b.files {
		if err := tw.WriteHeader(&tar.Header{Name: "unilet-diag/" + f.name, Mode: 0o600, Size: int64(len(f.data)), ModTime: now, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		if _, err := tw.Write(f.data); err != nil {
			return err
		}
	}
	for _, c := range []io.Closer{tw, gz} {
		if err := c.Close(); err != nil {
			return err
		}
	}
	if err := tmp.Chmod(0o600); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), output)
}

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/unilet-dev/unilet/api/admin"
)

func logsCmd(g *globals) *cobra.Command {
	var r admin.LogsRequest
	var timestamps, raw bool
	cmd := &cobra.Command{
		Use:   "logs CONTAINER",
		Short: "print a container's console output (its CRI log), as kubectl logs does",
		Long: `logs prints what a container's VM wrote on its serial console. -f follows it
until the VM ends; --previous shows the attempt before (after a restart).
A pod with one container may be named instead of the container.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r.Container = args[0]
			return withClient(g, func(ctx context.Context, c *client) error {
				ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
				defer stop()
				s, err := c.Logs(ctx, &r)
				if err != nil {
					return err
				}
				out := bufio.NewWriter(cmd.OutOrStdout())
				defer out.Flush()
				p := criLogPrinter{w: out, timestamps: timestamps, raw: raw}
				for {
					m, err := s.Recv()
					if errors.Is(err, io.EOF) || (err != nil && ctx.Err() != nil) {
						return p.flush()
					}
					if err != nil {
						return err
					}
					if err := p.write(m.GetData()); err != nil {
						return err
					}
					if r.Follow {
						out.Flush()
					}
				}
			})
		},
		ValidArgsFunction: completeNames(g),
	}
	cmd.Flags().BoolVarP(&r.Follow, "follow", "f", false, "follow the log until the VM ends")
	cmd.Flags().BoolVarP(&r.Previous, "previous", "p", false, "the log of the container's previous attempt")
	cmd.Flags().Int64Var(&r.TailLines, "tail", 0, "only the last N lines (0: all)")
	cmd.Flags().BoolVar(&timestamps, "timestamps", false, "prefix each line with the time it was written")
	cmd.Flags().BoolVar(&raw, "raw", false, "print the CRI log lines as stored")
	cmd.Flags().BoolVar(&r.Redact, "redact", false, "replace the container's environment values (not with -f)")
	return cmd
}

// criLogPrinter turns CRI log lines ("TIME STREAM P|F TEXT") into the text
// (joining partial lines), as kubectl logs prints them.
type criLogPrinter struct {
	w          io.Writer
	timestamps bool
	raw        bool
	pending    []byte // an incomplete line of the stream
}

func (p *criLogPrinter) write(b []byte) error {
	if p.raw {
		_, err := p.w.Write(b)
		return err
	}
	p.pending = append(p.pending, b...)
	for {
		i := bytes.IndexByte(p.pending, '\n')
		if i < 0 {
			return nil
		}
		line := p.pending[:i]
		p.pending = p.pending[i+1:]
		if err := p.line(line); err != nil {
			return err
		}
	}
}

func (p *criLogPrinter) line(l []byte) error {
	ts, rest, ok1 := bytes.Cut(l, []byte(" "))
	stream, rest, ok2 := bytes.Cut(rest, []byte(" "))
	tag, text, ok3 := bytes.Cut(rest, []byte(" "))
	_, terr := time.Parse(time.RFC3339Nano, string(ts))
	if !ok1 || !ok2 || !ok3 || terr != nil || (string(stream) != "stdout" && string(stream) != "stderr") ||
		(string(tag) != "P" && string(tag) != "F") {
		_, err := fmt.Fprintf(p.w, "%s\n", l) // not a CRI line: as it is
		return err
	}
	if p.timestamps {
		if _, err := fmt.Fprintf(p.w, "%s ", ts); err != nil {
			return err
		}
	}
	if _, err := p.w.Write(text); err != nil {
		return err
	}
	if string(tag) == "P" { // partial: the line goes on in the next entry
		return nil
	}
	_, err := p.w.Write([]byte("\n"))
	return err
}

func (p *criLogPrinter) flush() error {
	if len(p.pending) == 0 {
		return nil
	}
	err := p.line(p.pending)
	p.pending = nil
	return err
}

func consoleCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "console CONTAINER",
		Short: "attach to a running VM's serial console (Ctrl-] detaches), as kubectl attach -it",
		Long: `console connects this terminal to the serial console of a running VM: what
the guest writes appears here, what you type goes to the guest. Ctrl-]
detaches; the VM runs on. A pod with one container may be named instead.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withClient(g, func(ctx context.Context, c *client) error {
				return console(ctx, c, args[0], os.Stdin, cmd.OutOrStdout(), cmd.ErrOrStderr())
			})
		},
		ValidArgsFunction: completeNames(g),
	}
}

// console runs one console session: in (put in raw mode when a terminal)
// to the guest, the guest to out.
func console(ctx context.Context, c *client, name string, in *os.File, out, errw io.Writer) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := c.Console(ctx)
	if err != nil {
		return err
	}
	if err := s.Send(&admin.ConsoleInput{Container: name}); err != nil {
		return err
	}
	if fd := int(in.Fd()); term.IsTerminal(fd) {
		old, err := term.MakeRaw(fd)
		if err != nil {
			return err
		}
		defer term.Restore(fd, old)
	}
	fmt.Fprintf(errw, "attached to the console of %s; Ctrl-] detaches\r\n", name)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := in.Read(buf)
			if n > 0 {
				if s.Send(&admin.ConsoleInput{Data: append([]byte(nil), buf[:n]...)}) != nil {
					return
				}
			}
			if err != nil {
				_ = s.CloseSend()
				return
			}
		}
	}()
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			fmt.Fprint(errw, "\r\ndetached\r\n")
			return nil
		}
		if err != nil {
			return err
		}
		if _, err := out.Write(m.GetData()); err != nil {
			return err
		}
	}
}

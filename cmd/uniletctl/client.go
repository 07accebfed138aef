package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/unilet-dev/unilet/api/admin"
	"github.com/unilet-dev/unilet/pkg/version"
)

// callTimeout bounds one unary call to the daemon.
const callTimeout = 30 * time.Second

// client is a connection to the daemon: its operator API and CRI.
type client struct {
	admin.AdminClient
	cri  runtimeapi.RuntimeServiceClient
	conn *grpc.ClientConn
}

// dial connects to the daemon at endpoint (unix://PATH). gRPC connects
// lazily: a missing socket shows in the first call (see explain).
func dial(endpoint string) (*client, error) {
	path, ok := strings.CutPrefix(endpoint, "unix://")
	if !ok || path == "" {
		return nil, fmt.Errorf("--endpoint %q: want unix:///path/to/unilet.sock", endpoint)
	}
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("no unilet daemon socket at %s (%v): is unilet running on this node? Give its socket with --endpoint", path, errors.Unwrap(err))
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		return nil, err
	}
	return &client{AdminClient: admin.NewAdminClient(conn), cri: runtimeapi.NewRuntimeServiceClient(conn), conn: conn}, nil
}

func (c *client) Close() { c.conn.Close() }

// withClient runs fn with a connection to the daemon of g and says what to
// do about the errors operators meet.
func withClient(g *globals, fn func(ctx context.Context, c *client) error) error {
	c, err := dial(g.endpoint)
	if err != nil {
		return err
	}
	defer c.Close()
	return explain(fn(context.Background(), c), g.endpoint)
}

// explain turns gRPC errors into what an operator acts on.
func explain(err error, endpoint string) error {
	st, ok := status.FromError(err)
	if err == nil || !ok {
		return err
	}
	switch st.Code() {
	case codes.Unavailable:
		return fmt.Errorf("the unilet daemon at %s does not answer (%s): is it running? (`uniletctl diag` needs it too; see docs/troubleshooting.md)", endpoint, st.Message())
	case codes.Unimplemented:
		return fmt.Errorf("the daemon at %s does not know this call (%s): it is older than this uniletctl; upgrade the daemon or use its own uniletctl", endpoint, st.Message())
	case codes.PermissionDenied:
		return fmt.Errorf("%s (the socket is root's: run uniletctl as root)", st.Message())
	}
	return fmt.Errorf("%s (%s)", st.Message(), st.Code()) // the code, as kubectl shows the server's reason
}

func timeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, callTimeout)
}

// render writes v as JSON or YAML; table output is the caller's.
func render(w io.Writer, format string, v any) error {
	var generic any
	switch m := v.(type) {
	case proto.Message:
		b, err := protojson.MarshalOptions{EmitUnpopulated: true}.Marshal(m)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(b, &generic); err != nil {
			return err
		}
	case json.RawMessage:
		d := json.NewDecoder(bytes.NewReader(m))
		d.UseNumber()
		if err := d.Decode(&generic); err != nil {
			return err
		}
		generic = numbers(generic)
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(b, &generic); err != nil {
			return err
		}
	}
	switch format {
	case "json":
		e := json.NewEncoder(w)
		e.SetIndent("", "  ")
		return e.Encode(generic)
	case "yaml":
		e := yaml.NewEncoder(w)
		e.SetIndent(2)
		defer e.Close()
		return e.Encode(generic)
	}
	return fmt.Errorf("-o %q: want table, json or yaml", format)
}

// numbers turns the json.Numbers of a decoded document into int64 or
// float64, so YAML shows them as numbers and JSON keeps every digit.
func numbers(v any) any {
	switch t := v.(type) {
	case json.Number:
		if i, err := t.Int64(); err == nil {
			return i
		}
		f, _ := t.Float64()
		return f
	case map[string]any:
		for k, e := range t {
			t[k] = numbers(e)
		}
	case []any:
		for i, e := range t {
			t[i] = numbers(e)
		}
	}
	return v
}

// checkOutput validates -o before anything is asked of the daemon.
func checkOutput(g *globals) error {
	switch g.output {
	case "table", "json", "yaml":
		return nil
	}
	return fmt.Errorf("-o %q: want table, json or yaml", g.output)
}

func printVersion(cmd *cobra.Command, g *globals) error {
	out := cmd.OutOrStdout()
	fmt.Fprintln(out, "uniletctl", version.Version)
	return withClient(g, func(ctx context.Context, c *client) error {
		ctx, cancel := timeout(ctx)
		defer cancel()
		v, err := c.cri.Version(ctx, &runtimeapi.VersionRequest{})
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "daemon %s %s (CRI %s)\n", v.GetRuntimeName(), v.GetRuntimeVersion(), v.GetRuntimeApiVersion())
		return nil
	})
}

// listCmd makes cmd a listing: it asks the daemon (get) and writes the
// answer as -o json or yaml, or as table writes it.
func listCmd[T proto.Message](g *globals, cmd *cobra.Command, get func(context.Context, *client) (T, error), table func(io.Writer, T) error) *cobra.Command {
	cmd.Args = cobra.NoArgs
	cmd.RunE = func(c *cobra.Command, _ []string) error {
		if err := checkOutput(g); err != nil {
			return err
		}
		return withClient(g, func(ctx context.Context, cl *client) error {
			ctx, cancel := timeout(ctx)
			defer cancel()
			r, err := get(ctx, cl)
			if err != nil {
				return err
			}
			if g.output != "table" {
				return render(c.OutOrStdout(), g.output, r)
			}
			return table(c.OutOrStdout(), r)
		})
	}
	return cmd
}

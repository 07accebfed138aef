package runtime

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"time"
)

// QMP is a minimal QEMU Machine Protocol client: enough to power a guest down
// and read its run state.
type QMP struct {
	conn net.Conn
	r    *bufio.Reader
}

// DialQMP connects to a QMP socket, reads the greeting and negotiates capabilities.
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	q := &QMP{conn: conn, r: bufio.NewReader(conn)}
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("read QMP greeting: %w", err)
	}
	if err := json.Unmarshal(line, &greeting); err != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("unexpected QMP greeting %q", line)
	}
	if _, err := q.Execute("qmp_capabilities"); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// Execute runs one command and returns its "return" payload. Events that
// arrive before the reply are skipped.
func (q *QMP) Execute(cmd string) (json.RawMessage, error) {
	b, _ := json.Marshal(map[string]string{"execute": cmd})
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("QMP %s: bad reply %q", cmd, line)
		}
		if resp.Event != "" {
			continue
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, resp.Error.Class, resp.Error.Desc)
		}
		return resp.Return, nil
	}
}

// Status returns the VM run state ("running", "internal-error", "guest-panicked", …).
func (q *QMP) Status() (string, error) {
	raw, err := q.Execute("query-status")
	if err != nil {
		return "", err
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

// Close closes the connection.
func (q *QMP) Close() error { return q.conn.Close() }

// qmpDo dials, runs fn and closes, all within timeout.
func qmpDo(path string, timeout time.Duration, fn func(*QMP) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	q, err := DialQMP(ctx, path)
	if err != nil {
		return err
	}
	defer q.Close()
	return fn(q)
}

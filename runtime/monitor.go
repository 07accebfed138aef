package runtime

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// monitor owns a VM's single QMP connection (a QMP chardev serves one client
// at a time): commands are serialised, and events are handed to onEvent.
type monitor struct {
	conn    net.Conn
	mu      sync.Mutex
	replies chan qmpReply
	onEvent func(name string)
	closed  chan struct{}
}

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string `json:"event"`
}

// newMonitor reads QEMU's greeting on conn (until deadline), negotiates
// capabilities and starts reading.
func newMonitor(conn net.Conn, deadline time.Time, onEvent func(string)) (*monitor, error) {
	r := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(deadline)
	line, err := r.ReadBytes('\n')
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("read QMP greeting: %w", err)
	}
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if json.Unmarshal(line, &greeting) != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("unexpected QMP greeting %q", line)
	}
	_ = conn.SetReadDeadline(time.Time{})
	m := &monitor{conn: conn, replies: make(chan qmpReply, 1), onEvent: onEvent, closed: make(chan struct{})}
	go m.read(r)
	// Generous: QEMU answers slowly while a node boots many VMs at once.
	if _, err := m.execute("qmp_capabilities", 10*time.Second); err != nil {
		conn.Close()
		return nil, err
	}
	return m, nil
}

func (m *monitor) read(r *bufio.Reader) {
	defer close(m.closed)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		var msg qmpReply
		if json.Unmarshal(line, &msg) != nil {
			continue
		}
		if msg.Event != "" {
			if m.onEvent != nil {
				go m.onEvent(msg.Event)
			}
			continue
		}
		select {
		case m.replies <- msg:
		default: // nobody waits (timed out earlier): drop
		}
	}
}

var errMonitorClosed = errors.New("QMP connection closed")

func (m *monitor) execute(cmd string, timeout time.Duration) (json.RawMessage, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, _ := json.Marshal(map[string]string{"execute": cmd})
	if _, err := m.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	select {
	case r := <-m.replies:
		if r.Error != nil {
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, r.Error.Class, r.Error.Desc)
		}
		return r.Return, nil
	case <-m.closed:
		return nil, errMonitorClosed
	case <-time.After(timeout):
		return nil, fmt.Errorf("QMP %s: no reply within %s", cmd, timeout)
	}
}

func (m *monitor) status() (string, error) {
	raw, err := m.execute("query-status", 10*time.Second)
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

func (m *monitor) close() { m.conn.Close() }

package vmm

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// monitor owns a VM's single QMP connection (a QMP chardev serves one client
// at a time): commands are serialised, and events are handed to onEvent.
//
// Every command carries an id and its reply is handed only to the caller
// that sent that id: a reply arriving after its caller gave up is dropped,
// never taken for the answer to the next command.
type monitor struct {
	conn    net.Conn
	writeMu sync.Mutex
	mu      sync.Mutex
	seq     uint64
	waiting map[uint64]chan qmpReply
	onEvent func(name string)
	closed  chan struct{}
}

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string          `json:"event"`
	ID    json.RawMessage `json:"id"`
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
	m := &monitor{conn: conn, waiting: map[uint64]chan qmpReply{}, onEvent: onEvent, closed: make(chan struct{})}
	go m.read(r)
	if _, err := m.execute("qmp_capabilities", qmpQueryTimeout); err != nil {
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
		var id uint64
		if json.Unmarshal(msg.ID, &id) != nil {
			continue // not an answer to one of ours
		}
		m.mu.Lock()
		ch := m.waiting[id]
		delete(m.waiting, id)
		m.mu.Unlock()
		if ch != nil { // nil: its caller gave up; the reply is dropped
			ch <- msg
		}
	}
}

var errMonitorClosed = errors.New("QMP connection closed")

// Deadlines of QMP commands.
const (
	// qmpQueryTimeout bounds negotiation and status queries: generous, as
	// QEMU answers slowly while a node boots many VMs at once.
	qmpQueryTimeout = 10 * time.Second
	// qmpPowerdownTimeout bounds the ACPI power-button request of a
	// graceful stop (the stop's own timeout then waits for the guest).
	qmpPowerdownTimeout = time.Second
)

func (m *monitor) execute(cmd string, timeout time.Duration) (json.RawMessage, error) {
	return m.call(cmd, nil, nil, timeout)
}

// call runs cmd with arguments args (nil: none); oob, when set, is sent
// with the command as ancillary data (SCM_RIGHTS for getfd).
func (m *monitor) call(cmd string, args any, oob []byte, timeout time.Duration) (json.RawMessage, error) {
	ch := make(chan qmpReply, 1)
	m.mu.Lock()
	m.seq++
	id := m.seq
	m.waiting[id] = ch
	m.mu.Unlock()
	forget := func() {
		m.mu.Lock()
		delete(m.waiting, id)
		m.mu.Unlock()
	}
	b, _ := json.Marshal(struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{cmd, args, id})
	m.writeMu.Lock()
	_ = m.conn.SetWriteDeadline(time.Now().Add(timeout))
	var err error
	if uc, ok := m.conn.(*net.UnixConn); ok && oob != nil {
		_, _, err = uc.WriteMsgUnix(append(b, '\n'), oob, nil)
	} else if oob != nil {
		err = errors.New("the QMP connection cannot carry file descriptors")
	} else {
		_, err = m.conn.Write(append(b, '\n'))
	}
	m.writeMu.Unlock()
	if err != nil {
		forget()
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-ch:
		if r.Error != nil {
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, r.Error.Class, r.Error.Desc)
		}
		return r.Return, nil
	case <-m.closed:
		forget()
		return nil, errMonitorClosed
	case <-t.C:
		forget()
		return nil, fmt.Errorf("QMP %s: no reply within %s", cmd, timeout)
	}
}

func (m *monitor) status() (string, error) {
	raw, err := m.execute("query-status", qmpQueryTimeout)
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

// sendFD hands f to QEMU under name (QMP getfd), for a later "fd:name" URI.
func (m *monitor) sendFD(name string, f *os.File) error {
	_, err := m.call("getfd", map[string]string{"fdname": name}, unix.UnixRights(int(f.Fd())), qmpQueryTimeout)
	return err
}

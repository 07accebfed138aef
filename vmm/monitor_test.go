package vmm

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// fakeQMP serves a QMP greeting and hands each command to answer.
func fakeQMP(t *testing.T, answer func(w net.Conn, cmd string, id json.RawMessage)) *monitor {
	t.Helper()
	client, server := net.Pipe()
	t.Cleanup(func() { client.Close(); server.Close() })
	go func() {
		fmt.Fprintln(server, `{"QMP": {"version": {}, "capabilities": []}}`)
		r := bufio.NewReader(server)
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			var req struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			require.NoError(t, json.Unmarshal(line, &req))
			if req.Execute == "qmp_capabilities" {
				fmt.Fprintf(server, `{"return": {}, "id": %s}`+"\n", req.ID)
				continue
			}
			answer(server, req.Execute, req.ID)
		}
	}()
	m, err := newMonitor(client, time.Now().Add(5*time.Second), nil)
	require.NoError(t, err)
	return m
}

// A reply that arrives after its command timed out must never be read as
// the answer to the next command.
func TestMonitorLateReplyIsNotTakenForTheNextCommand(t *testing.T) {
	var lateID json.RawMessage
	m := fakeQMP(t, func(w net.Conn, cmd string, id json.RawMessage) {
		switch cmd {
		case "slow":
			lateID = id // answered only together with the next command
		case "query-status":
			fmt.Fprintf(w, `{"return": {"status": "paused-by-late-reply"}, "id": %s}`+"\n", lateID)
			fmt.Fprintf(w, `{"event": "RESUME"}`+"\n")
			fmt.Fprintf(w, `{"return": {"status": "running"}, "id": %s}`+"\n", id)
		}
	})
	_, err := m.execute("slow", 50*time.Millisecond)
	require.ErrorContains(t, err, "no reply within")
	st, err := m.status()
	require.NoError(t, err)
	require.Equal(t, "running", st)
	m.mu.Lock()
	require.Empty(t, m.waiting, "no waiter left behind")
	m.mu.Unlock()
}

func TestMonitorErrorReply(t *testing.T) {
	m := fakeQMP(t, func(w net.Conn, cmd string, id json.RawMessage) {
		fmt.Fprintf(w, `{"error": {"class": "GenericError", "desc": "nope"}, "id": %s}`+"\n", id)
	})
	_, err := m.execute("system_powerdown", time.Second)
	require.ErrorContains(t, err, "GenericError: nope")
}

// A guest that missed the first power-button press (still booting) gets
// another one while the stop waits.
func TestStopPressesThePowerButtonAgain(t *testing.T) {
	v := &VM{done: make(chan struct{})}
	presses := make(chan struct{}, 10)
	mon := fakeQMP(t, func(w net.Conn, cmd string, id json.RawMessage) {
		if cmd == "system_powerdown" {
			presses <- struct{}{}
			if len(presses) == 1 { // the guest listens from the second press on
				close(v.done)
			}
		}
		fmt.Fprintf(w, `{"return": {}, "id": %s}`+"\n", id)
	})
	start := time.Now()
	require.True(t, v.waitPoweroff(mon, 3*PowerButtonRepeat))
	require.Less(t, time.Since(start), 2*PowerButtonRepeat)
	require.Len(t, presses, 1)

	v = &VM{done: make(chan struct{})} // a guest that never listens: the wait ends at its timeout
	require.False(t, v.waitPoweroff(mon, PowerButtonRepeat/2))
}

package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// SnapshotRow compares restoring a booted guest from a QEMU migration
// snapshot (a "template") with booting it.
type SnapshotRow struct {
	SnapshotMB float64
	Restore    Summary // ms, QEMU spawn with -incoming → the guest echoes a byte
	BootEcho   Summary // ms, QEMU spawn → the guest's "echo: ready" line (boot)
	QEMUMB     float64 // RSS of a restored QEMU
}

// qmp runs commands on a QMP socket and returns the last reply.
func qmp(sock string, cmds ...string) (map[string]any, error) {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	dec := json.NewDecoder(c)
	var msg map[string]any
	if err := dec.Decode(&msg); err != nil { // greeting
		return nil, err
	}
	for _, cmd := range append([]string{`{"execute":"qmp_capabilities"}`}, cmds...) {
		if _, err := io.WriteString(c, cmd+"\n"); err != nil {
			return nil, err
		}
		for {
			msg = nil
			if err := dec.Decode(&msg); err != nil {
				return nil, err
			}
			if _, ev := msg["event"]; !ev {
				break
			}
		}
		if e, ok := msg["error"]; ok {
			return nil, fmt.Errorf("QMP %s: %v", cmd, e)
		}
	}
	return msg, nil
}

// measureSnapshot boots the guest in echo mode, saves it with QMP migrate to
// a file, then restores it runs times (interleaved with fresh boots).
func (e *env) measureSnapshot(o options, res *Results) error {
	// Without QEMU's seccomp filter: the snapshot is written through an
	// exec: migration, a process QEMU spawns (spawn=deny forbids it).
	argv := withoutSandbox(e.bareArgv(e.argv, 7000, tickArg, "echo"))
	sock := filepath.Join(e.run, "bare", "7000.sock")
	snap := filepath.Join(e.dir, "template.snap")
	src, out, _, err := e.spawnBare(argv, 0)
	if err != nil {
		return err
	}
	if err := readUntil(out, "echo: ready\n"); err != nil {
		src.kill()
		return fmt.Errorf("template boot: %w", err)
	}
	_, err = qmp(sock, `{"execute":"migrate","arguments":{"uri":"exec:cat > `+snap+`"}}`)
	for deadline := time.Now().Add(60 * time.Second); err == nil; time.Sleep(20 * time.Millisecond) {
		var r map[string]any
		if r, err = qmp(sock, `{"execute":"query-migrate"}`); err != nil {
			break
		}
		st, _ := r["return"].(map[string]any)["status"].(string)
		if st == "completed" {
			break
		}
		if st == "failed" || time.Now().After(deadline) {
			err = fmt.Errorf("migration %s", st)
		}
	}
	src.kill()
	if err != nil {
		return fmt.Errorf("saving the template: %w", err)
	}
	row := SnapshotRow{SnapshotMB: round(float64(fileSize(snap))/(1<<20), 1)}
	var restores, boots, rss []float64
	for i := 0; i < o.floorRuns; i++ {
		b, out, t0, err := e.spawnBare(append(append([]string(nil), argv...), "-incoming", "exec:cat "+snap), 0)
		if err != nil {
			return err
		}
		// A byte that arrives while the migration stream loads is lost
		// with the serial port's old state: type one every millisecond.
		typed := make(chan struct{})
		go func() {
			for {
				select {
				case <-typed:
					return
				case <-time.After(time.Millisecond):
					_, _ = b.stdin.Write([]byte("@"))
				}
			}
		}()
		err = readUntil(out, "@")
		close(typed)
		if err != nil {
			b.kill()
			return fmt.Errorf("restore: %w", err)
		}
		restores = append(restores, ms(time.Since(t0)))
		rss = append(rss, rssMB(b.cmd.Process.Pid))
		b.kill()

		if b, out, t0, err = e.spawnBare(argv, 0); err != nil {
			return err
		}
		if err := readUntil(out, "echo: ready\n"); err != nil {
			b.kill()
			return fmt.Errorf("boot: %w", err)
		}
		boots = append(boots, ms(time.Since(t0)))
		b.kill()
	}
	row.Restore, row.BootEcho, row.QEMUMB = summarize(restores), summarize(boots), round(mean(rss), 1)
	res.Details.Snapshot = &row
	_ = os.Remove(snap)
	return nil
}

// readUntil reads r until it has seen s (10 s at most).
func readUntil(r *bufio.Reader, s string) error {
	done := make(chan error, 1)
	go func() {
		var seen strings.Builder
		for {
			b, err := r.ReadByte()
			if err != nil {
				done <- fmt.Errorf("%v (output so far: %q)", err, seen.String())
				return
			}
			seen.WriteByte(b)
			if strings.HasSuffix(seen.String(), s) {
				done <- nil
				return
			}
		}
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		return fmt.Errorf("no %q within 10 s", s)
	}
}

// withoutSandbox drops -sandbox and its value from argv.
func withoutSandbox(argv []string) []string {
	var out []string
	for i := 0; i < len(argv); i++ {
		if argv[i] == "-sandbox" {
			i++
			continue
		}
		out = append(out, argv[i])
	}
	return out
}

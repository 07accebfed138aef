// Package crilog writes a byte stream (a VM's serial console) into a CRI
// container log file in the kubelet text format:
//
//	<RFC3339Nano timestamp> <stream> <P|F> <content>
//
// Complete lines carry the tag F; a line longer than the maximum, or a pending
// partial line flushed on request, is written as P parts that kubelet joins
// with the following line. Reopen supports kubelet's log rotation.
package crilog

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// DefaultMaxLine is the longest content written in one log line (as containerd).
const DefaultMaxLine = 16 * 1024

// Tags.
const (
	TagPartial = "P"
	TagFull    = "F"
)

// Writer turns a byte stream into CRI log lines. It is safe for concurrent use.
type Writer struct {
	mu      sync.Mutex
	path    string
	f       *os.File
	stream  string
	maxLine int
	pending []byte
	now     func() time.Time
	// Write-through when idle, batched when busy: output after a quiet
	// flushDelay goes to the file at once; a flood is written every
	// flushDelay or flushSize bytes, saving a write(2) per console chunk.
	buf        []byte
	lastFlush  time.Time
	timer      *time.Timer
	werr       error // a failed background flush, returned by the next call
	flushDelay time.Duration
	// Console lines a failed write dropped since the last good one, and why.
	dropped int
	dropErr error
}

const (
	defaultFlushDelay = 5 * time.Millisecond
	flushSize         = 64 << 10
)

// Option configures a Writer.
type Option func(*Writer)

// WithMaxLine sets the split length (tests).
func WithMaxLine(n int) Option { return func(w *Writer) { w.maxLine = n } }

// WithClock sets the time source (tests).
func WithClock(now func() time.Time) Option { return func(w *Writer) { w.now = now } }

// withFlushDelay sets the batching delay (tests on slow, e.g. race-built, runs).
func withFlushDelay(d time.Duration) Option { return func(w *Writer) { w.flushDelay = d } }

// WithStream sets the stream name (default "stdout").
func WithStream(s string) Option { return func(w *Writer) { w.stream = s } }

// Open opens (appending, creating parent directories) the log at path.
func Open(path string, opts ...Option) (*Writer, error) {
	w := &Writer{path: path, stream: "stdout", maxLine: DefaultMaxLine, now: time.Now, flushDelay: defaultFlushDelay}
	for _, o := range opts {
		o(w)
	}
	f, err := openLog(path)
	if err != nil {
		return nil, err
	}
	w.f = f
	return w, nil
}

func openLog(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create log directory: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open container log: %w", err)
	}
	return f, nil
}

// Path returns the log file path.
func (w *Writer) Path() string { return w.path }

// Write consumes console bytes. Complete lines are written at once; the
// remainder is kept until its newline arrives, the line grows past the
// maximum, or FlushPartial/Close is called.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(p)
	var out bytes.Buffer
	ts := w.now().UTC().Format(time.RFC3339Nano)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			w.pending = append(w.pending, p...)
			p = nil
		} else {
			w.pending = append(w.pending, p[:i]...)
			p = p[i+1:]
			line := bytes.TrimSuffix(w.pending, []byte{'\r'})
			for len(line) > w.maxLine {
				w.format(&out, ts, TagPartial, line[:w.maxLine])
				line = line[w.maxLine:]
			}
			w.format(&out, ts, TagFull, line)
			w.pending = w.pending[:0]
		}
		for len(w.pending) > w.maxLine {
			w.format(&out, ts, TagPartial, w.pending[:w.maxLine])
			w.pending = append(w.pending[:0], w.pending[w.maxLine:]...)
		}
	}
	if out.Len() > 0 {
		if err := w.writeOut(out.Bytes()); err != nil {
			return 0, err
		}
	}
	return n, nil
}

func (w *Writer) format(out *bytes.Buffer, ts, tag string, content []byte) {
	out.WriteString(ts)
	out.WriteByte(' ')
	out.WriteString(w.stream)
	out.WriteByte(' ')
	out.WriteString(tag)
	out.WriteByte(' ')
	out.Write(content)
	out.WriteByte('\n')
}

func (w *Writer) writeOut(b []byte) error {
	if w.f == nil {
		return fmt.Errorf("container log %s is closed", w.path)
	}
	w.buf = append(w.buf, b...)
	// A failed background flush is reported now (its lines are counted).
	werr := w.werr
	w.werr = nil
	if len(w.buf) >= flushSize || time.Since(w.lastFlush) >= w.flushDelay {
		if err := w.flushLocked(); err != nil {
			return err
		}
		return werr
	}
	if w.timer == nil {
		w.timer = time.AfterFunc(w.flushDelay, func() {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.timer = nil
			if err := w.flushLocked(); err != nil {
				w.werr = err
			}
		})
	}
	return werr
}

// flushLocked writes the batched lines; caller holds w.mu. The file only
// ever holds whole lines: when a write fails (a full disk) the lines that
// did not fit are dropped, a partly written line is cut off again, and the
// next write that succeeds is preceded by a stderr line saying how many
// console lines were lost and why.
func (w *Writer) flushLocked() error {
	w.lastFlush = time.Now()
	if len(w.buf) == 0 || w.f == nil {
		return nil
	}
	if w.dropped > 0 {
		note := fmt.Sprintf("[unilet: %d console line(s) were not written to this log: %v]", w.dropped, w.dropErr)
		var out bytes.Buffer
		out.WriteString(w.now().UTC().Format(time.RFC3339Nano) + " stderr " + TagFull + " " + note + "\n")
		w.buf = append(out.Bytes(), w.buf...)
	}
	off, _ := w.f.Seek(0, io.SeekEnd)
	n, err := w.f.Write(w.buf)
	if err == nil {
		w.dropped, w.dropErr = 0, nil
		w.buf = w.buf[:0]
		return nil
	}
	keep := bytes.LastIndexByte(w.buf[:n], '\n') + 1
	if keep < n {
		_ = w.f.Truncate(off + int64(keep))
	}
	lost := bytes.Count(w.buf[keep:], []byte{'\n'})
	if w.dropped > 0 && keep == 0 {
		lost-- // the note itself is not a console line
	}
	if keep > 0 {
		w.dropped = 0
	}
	w.dropped += lost
	w.dropErr = err
	w.buf = w.buf[:0]
	return fmt.Errorf("write container log %s (%d console line(s) dropped): %w", w.path, w.dropped, err)
}

// Flush writes batched lines now.
func (w *Writer) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.flushLocked()
}

// FlushPartial writes a pending incomplete line as a P part (used when the
// console has gone quiet mid-line, e.g. at a prompt).
func (w *Writer) FlushPartial() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	// A trailing "\r" stays pending: it may be the first half of a "\r\n".
	n := len(w.pending)
	if n > 0 && w.pending[n-1] == '\r' {
		n--
	}
	if n == 0 {
		return nil
	}
	var out bytes.Buffer
	w.format(&out, w.now().UTC().Format(time.RFC3339Nano), TagPartial, w.pending[:n])
	w.pending = append(w.pending[:0], w.pending[n:]...)
	return w.writeOut(out.Bytes())
}

// Reopen closes and reopens the file at the same path (after kubelet renamed it).
func (w *Writer) Reopen() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	f, err := openLog(w.path)
	if err != nil {
		return err
	}
	if w.f != nil {
		_ = w.flushLocked() // what was batched belongs to the rotated file
		_ = w.f.Close()
	}
	w.f = f
	return nil
}

// Close writes a pending incomplete line as a final F line and closes the file.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	var err error
	if len(w.pending) > 0 {
		var out bytes.Buffer
		w.format(&out, w.now().UTC().Format(time.RFC3339Nano), TagFull, bytes.TrimSuffix(w.pending, []byte{'\r'}))
		w.pending = w.pending[:0]
		err = w.writeOut(out.Bytes())
	}
	if w.timer != nil {
		w.timer.Stop()
		w.timer = nil
	}
	if ferr := w.flushLocked(); err == nil {
		err = ferr
	}
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	w.f = nil
	return err
}

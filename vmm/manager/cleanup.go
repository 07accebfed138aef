package manager

// cleanups is the undo stack of one start path (firecracker-go-sdk's
// machine.go keeps one the same way): every step that leaves something
// behind — a cgroup, a jail uid, a VM directory, a shim — pushes how to
// undo it right after it succeeds; on failure the steps are undone newest
// first, so "on error nothing is left" is read off the pushes, not hoped.
type cleanups struct {
	steps []cleanup
}

type cleanup struct {
	what string
	undo func() error
}

// push records how to undo the step just taken.
func (c *cleanups) push(what string, undo func() error) {
	c.steps = append(c.steps, cleanup{what, undo})
}

// run undoes every recorded step, newest first, and empties the stack; it
// reports each undo that failed by calling failed (nil: ignore).
func (c *cleanups) run(failed func(what string, err error)) {
	for i := len(c.steps) - 1; i >= 0; i-- {
		if err := c.steps[i].undo(); err != nil && failed != nil {
			failed(c.steps[i].what, err)
		}
	}
	c.steps = nil
}

// keep forgets the recorded steps: the start succeeded and its owner now
// holds what they made.
func (c *cleanups) keep() { c.steps = nil }

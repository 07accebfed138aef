package manager

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestCleanupsRunNewestFirstAndOnce(t *testing.T) {
	var order []string
	var c cleanups
	for _, s := range []string{"cgroup", "uid", "shim"} {
		c.push(s, func() error {
			order = append(order, s)
			if s == "uid" {
				return errors.New("busy")
			}
			return nil
		})
	}
	var failed []string
	c.run(func(what string, err error) { failed = append(failed, what+": "+err.Error()) })
	require.Equal(t, []string{"shim", "uid", "cgroup"}, order)
	require.Equal(t, []string{"uid: busy"}, failed)
	c.run(nil)
	require.Len(t, order, 3, "a second run undoes nothing again")

	c.push("kept", func() error { t.Fatal("undone after keep"); return nil })
	c.keep()
	c.run(nil)
}

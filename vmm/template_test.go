package vmm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// A template boots once; its clones start from its snapshot, not from the
// kernel: two clones at once each run on from where the template stopped
// (in echo mode, echoing what is typed, without booting again), their RAM
// a private copy-on-write mapping of the one sealed template memfd.
func TestTemplateClonesRunOnFromTheSnapshot(t *testing.T) {
	k := testKernel(t)
	dir, ram, tmpl, size := makeTemplate(t, k)
	st, err := os.Stat(filepath.Join(dir, "state"))
	require.NoError(t, err)
	require.Less(t, st.Size(), int64(4<<20), "the device state holds no RAM")
	var fst unix.Stat_t
	require.NoError(t, unix.Stat(filepath.Join(dir, "ram"), &fst))
	require.Less(t, fst.Blocks*512, size/2, "pages the guest never wrote are holes")
	require.Error(t, SaveRAMFile(ram, filepath.Join(dir, "ram"), size), "an existing file is never overwritten")
	require.NoError(t, CheckSealed(tmpl))
	_, err = tmpl.WriteAt([]byte{1}, 0)
	require.Error(t, err, "the template RAM is sealed against writes")
	require.Error(t, CheckSealed(ram), "an unsealed memfd is no clone's RAM")

	var clones []*VM
	var logs []string
	for i := 0; i < 2; i++ {
		cs := bootSpec(t, k, "echo")
		cs.Machine.RAM, cs.Machine.Incoming = &RAMBacking{}, true
		_, err := StartVMWith(cs, Files{RAM: ram})
		require.ErrorContains(t, err, "seal", "a clone never maps an unsealed file")
		c, err := StartVMWith(cs, Files{RAM: tmpl})
		require.NoError(t, err)
		defer c.Kill()
		f, err := os.Open(filepath.Join(dir, "state"))
		require.NoError(t, err)
		t0 := time.Now()
		require.NoError(t, c.Restore(f, RestoreTimeout))
		t.Logf("clone %d restored in %s", i, time.Since(t0))
		f.Close()
		clones, logs = append(clones, c), append(logs, cs.LogPath)
	}
	for i, c := range clones {
		_, err := c.writeConsole([]byte("clone" + string(rune('A'+i)) + "\r"))
		require.NoError(t, err)
	}
	for i, l := range logs {
		waitLog(t, l, "clone"+string(rune('A'+i)), "clone %d echoes", i)
		b, _ := os.ReadFile(l)
		require.NotContains(t, string(b), "booted", "a clone does not boot again")
		require.False(t, strings.Contains(string(b), "clone"+string(rune('B'-i))), "clone %d saw the other's input", i)
	}
	// Pause and Resume: a paused clone echoes nothing until resumed.
	require.NoError(t, clones[0].Pause())
	_, err = clones[0].writeConsole([]byte("later\r"))
	require.NoError(t, err)
	time.Sleep(300 * time.Millisecond)
	b, _ := os.ReadFile(logs[0])
	require.NotContains(t, string(b), "later")
	require.NoError(t, clones[0].Resume())
	waitLog(t, logs[0], "later")
}

// makeTemplate boots the test kernel in echo mode with shared RAM,
// snapshots it into a directory (state, ram) and loads the RAM sealed:
// the directory, the template VM's own RAM, the sealed RAM and its size.
func makeTemplate(t *testing.T, k string) (string, *os.File, *os.File, int64) {
	dir := t.TempDir()
	spec := bootSpec(t, k, "echo")
	spec.Machine.RAM = &RAMBacking{Shared: true}
	size := int64(spec.Machine.MemoryMiB) << 20
	ram, err := NewRAMFile("t", size)
	require.NoError(t, err)
	t.Cleanup(func() { ram.Close() })
	v, err := StartVMWith(spec, Files{RAM: ram})
	require.NoError(t, err)
	waitLog(t, spec.LogPath, "echo: ready")
	state, err := os.Create(filepath.Join(dir, "state"))
	require.NoError(t, err)
	require.NoError(t, v.Snapshot(state, SnapshotTimeout))
	require.NoError(t, state.Close())
	v.Kill()
	<-v.Done()
	require.NoError(t, SaveRAMFile(ram, filepath.Join(dir, "ram"), size))
	tmpl, err := LoadRAMFile(filepath.Join(dir, "ram"), size, nil)
	require.NoError(t, err)
	t.Cleanup(func() { tmpl.Close() })
	return dir, ram, tmpl, size
}

// A warm clone is restored ahead of its pod and waits paused, writing no
// log; claimed, it runs with the pod's log from where the template
// stopped (input typed while it waited is echoed then). Only a held clone
// can be claimed, and only once.
func TestWarmCloneWaitsForItsClaim(t *testing.T) {
	k := testKernel(t)
	dir, _, tmpl, _ := makeTemplate(t, k)
	cs := bootSpec(t, k, "echo")
	logPath := cs.LogPath
	cs.LogPath = ""
	cs.Machine.RAM, cs.Machine.Incoming = &RAMBacking{}, true
	cs.Restore = &RestoreSpec{Hold: true}
	c, err := StartVMWith(cs, Files{RAM: tmpl})
	require.NoError(t, err)
	defer c.Kill()
	f, err := os.Open(filepath.Join(dir, "state"))
	require.NoError(t, err)
	require.NoError(t, c.Restore(f, RestoreTimeout))
	f.Close()
	mon, err := c.monitor()
	require.NoError(t, err)
	st, err := mon.status()
	require.NoError(t, err)
	require.Equal(t, "paused", st, "a held clone waits paused")
	_, err = c.writeConsole([]byte("early\r"))
	require.NoError(t, err)
	time.Sleep(300 * time.Millisecond)
	_, err = os.Stat(logPath)
	require.True(t, os.IsNotExist(err), "nothing is logged before the claim")

	claim := cs
	claim.LogPath = logPath
	t0 := time.Now()
	require.NoError(t, c.Claim(claim))
	t.Logf("claimed in %s", time.Since(t0))
	require.ErrorContains(t, c.Claim(claim), "claimed already")
	waitLog(t, logPath, "early")
	b, _ := os.ReadFile(logPath)
	require.NotContains(t, string(b), "booted", "a warm clone does not boot")
	require.WithinDuration(t, time.Now(), c.StartedAt(), 10*time.Second)
	require.True(t, c.StartedAt().After(t0.Add(-time.Millisecond)), "its start is the claim's")

	plain := bootSpec(t, k, "echo")
	v, err := StartVM(plain)
	require.NoError(t, err)
	defer v.Kill()
	require.ErrorContains(t, v.Claim(plain), "not a warm clone")
}

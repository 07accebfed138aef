package store

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

type meta struct{ name string }
type status struct{ n int }

// recSaver records what reaches "disk" and can be told to fail.
type recSaver struct {
	mu      sync.Mutex
	saved   map[string]status
	saves   int
	fail    error
	deletes int
}

func (r *recSaver) Save(id string, _ meta, s status) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail != nil {
		return r.fail
	}
	r.saves++
	r.saved[id] = s
	return nil
}

func (r *recSaver) Delete(id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail != nil {
		return r.fail
	}
	r.deletes++
	delete(r.saved, id)
	return nil
}

func id(c byte) string { return strings.Repeat(string(c), 64) }

func TestUpdateWritesDiskBeforeMemory(t *testing.T) {
	sv := &recSaver{saved: map[string]status{}}
	s := New[meta, status]("thing", sv)
	o, err := s.Add(id('a'), meta{"x"}, status{1})
	require.NoError(t, err)
	require.Equal(t, status{1}, sv.saved[id('a')])

	sv.fail = errors.New("disk full")
	err = o.Update(func(st status) (status, error) { st.n = 2; return st, nil })
	require.ErrorContains(t, err, "disk full")
	require.Equal(t, status{1}, o.Status(), "a failed write must not show in memory")

	sv.fail = nil
	require.NoError(t, o.Update(func(st status) (status, error) { st.n = 3; return st, nil }))
	require.Equal(t, status{3}, o.Status())
	require.Equal(t, status{3}, sv.saved[id('a')])

	require.Error(t, o.Update(func(st status) (status, error) { return st, ErrInvalidTransition }))
	require.Equal(t, status{3}, o.Status())
}

func TestDeletedObjectIsNeverSavedAgain(t *testing.T) {
	sv := &recSaver{saved: map[string]status{}}
	s := New[meta, status]("thing", sv)
	o, err := s.Add(id('b'), meta{}, status{})
	require.NoError(t, err)
	require.NoError(t, s.Delete(o))
	saves := sv.saves
	err = o.Update(func(st status) (status, error) { st.n = 9; return st, nil })
	require.ErrorIs(t, err, ErrDeleted)
	require.Equal(t, saves, sv.saves)
	_, ok := sv.saved[id('b')]
	require.False(t, ok, "a removed record came back")
	require.False(t, s.Has(id('b')))
	require.NoError(t, s.Delete(o), "deleting twice is fine")
	require.Equal(t, 1, sv.deletes)
}

func TestFailedDeleteKeepsObject(t *testing.T) {
	sv := &recSaver{saved: map[string]status{}}
	s := New[meta, status]("thing", sv)
	o, _ := s.Add(id('c'), meta{}, status{})
	sv.fail = errors.New("io error")
	require.Error(t, s.Delete(o))
	require.True(t, s.Has(id('c')))
	require.False(t, o.Deleted())
}

func TestGetByPrefix(t *testing.T) {
	s := New[meta, status]("thing", nil)
	a := "abcdef11" + strings.Repeat("0", 56)
	b := "abcdef22" + strings.Repeat("0", 56)
	_, _ = s.Add(a, meta{}, status{})
	_, _ = s.Add(b, meta{}, status{})
	o, err := s.Get("abcdef1")
	require.NoError(t, err)
	require.Equal(t, a, o.ID())
	_, err = s.Get("abcdef")
	require.ErrorIs(t, err, ErrAmbiguous)
	_, err = s.Get("abc")
	require.ErrorIs(t, err, ErrAmbiguous, "any prefix resolves, as containerd's do")
	o, err = s.Get("abcdef2")
	require.NoError(t, err)
	require.Equal(t, b, o.ID())
	exact, found, err := s.Match(a)
	require.True(t, exact && found)
	require.NoError(t, err)
	exact, found, err = s.Match("abcdef1")
	require.True(t, !exact && found)
	require.NoError(t, err)
	_, found, err = s.Match("zz")
	require.False(t, found)
	require.NoError(t, err)
	_, _, err = s.Match("abcdef")
	require.ErrorIs(t, err, ErrAmbiguous)
	_, err = s.Get("")
	require.ErrorIs(t, err, ErrNotFound)
	_, err = s.Add(a, meta{}, status{})
	require.ErrorIs(t, err, ErrAlreadyExists)
	require.Len(t, s.List(), 2)
}

func TestValidID(t *testing.T) {
	require.True(t, ValidID(id('0')))
	for _, bad := range []string{"", "/", "..", id('A'), id('g'), id('a') + "0", "../" + id('a')[3:]} {
		require.False(t, ValidID(bad), bad)
	}
}

func TestContainerTransitions(t *testing.T) {
	require.NoError(t, ContainerCreated.Check(ContainerStarting))
	require.NoError(t, ContainerStarting.Check(ContainerRunning))
	require.NoError(t, ContainerRunning.Check(ContainerStopping))
	require.NoError(t, ContainerStopping.Check(ContainerExited))
	require.NoError(t, ContainerExited.Check(ContainerRemoving))
	for _, bad := range [][2]ContainerState{
		{ContainerStarting, ContainerRemoving}, // remove waits for the start
		{ContainerRunning, ContainerRemoving},  // remove stops first
		{ContainerExited, ContainerRunning},    // nothing is resurrected
		{ContainerRemoving, ContainerExited},
		{ContainerRemoving, ContainerRunning},
		{ContainerExited, ContainerStarting},
	} {
		require.ErrorIs(t, bad[0].Check(bad[1]), ErrInvalidTransition, "%s → %s", bad[0], bad[1])
	}
	require.False(t, ContainerState("bogus").Valid())
	require.False(t, SandboxReady.CanBecome(SandboxReady))
	require.True(t, SandboxNotReady.CanBecome(SandboxRemoving))
	require.False(t, SandboxRemoving.CanBecome(SandboxReady))
}

// blockSaver holds every write until released (a slow fsync).
type blockSaver struct {
	entered chan string
	release chan struct{}
}

func (b *blockSaver) Save(id string, _ meta, _ status) error {
	b.entered <- id
	<-b.release
	return nil
}
func (b *blockSaver) Delete(id string) error { return b.Save(id, meta{}, status{}) }

// Readers never wait for a write's disk I/O: while an Add, an Update and a
// Delete are each stuck in their write, Get, List, Status and Has answer,
// and a twin Add of the ID being written is refused.
func TestReadersDoNotWaitForDiskWrites(t *testing.T) {
	b := &blockSaver{entered: make(chan string, 3), release: make(chan struct{})}
	s := New[meta, status]("container", b)
	s.Restore(id('a'), meta{}, status{n: 1})
	del := s.Restore(id('c'), meta{}, status{n: 3})
	go func() { _, _ = s.Add(id('b'), meta{}, status{}) }()
	o, err := s.Get(id('a'))
	require.NoError(t, err)
	go func() { _ = o.Update(func(st status) (status, error) { st.n = 2; return st, nil }) }()
	go func() { _ = s.Delete(del) }()
	for i := 0; i < 3; i++ {
		<-b.entered
	}
	// Every writer is inside its write now.
	done := make(chan struct{})
	go func() {
		defer close(done)
		require.Len(t, s.List(), 2, "a and c visible; b not yet")
		require.Equal(t, 1, o.Status().n, "memory keeps the old status until the disk has the new one")
		require.False(t, s.Has(id('b')))
		require.False(t, del.Deleted())
		_, err := s.Add(id('b'), meta{}, status{})
		require.ErrorIs(t, err, ErrAlreadyExists)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("readers waited for a disk write")
	}
	close(b.release)
	require.Eventually(t, func() bool { return o.Status().n == 2 && s.Has(id('b')) && !s.Has(id('c')) }, 5e9, 1e6)
}

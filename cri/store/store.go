// Package store holds unilet's CRI objects (unikernel sandboxes and
// containers) in memory, as containerd's CRI store does: each object has
// immutable metadata, a status changed only through guarded updates that
// are written to disk before memory, and a lifecycle lock of its own. A
// Store is also the ownership index the router reads: its map has its own
// lock, held only for map operations, never across I/O or a VM call; an
// object's status lock is held only to read or swap the status, never
// across a disk write, so readers never wait for bbolt's fsync.
package store

import (
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"sync"
)

// Errors of the store; the CRI boundary turns them into gRPC codes.
var (
	// ErrNotFound: no object has this ID (or unique ID prefix).
	ErrNotFound = errors.New("not found")
	// ErrAmbiguous: an ID prefix names more than one object.
	ErrAmbiguous = errors.New("ambiguous ID prefix")
	// ErrAlreadyExists: an object with this ID is stored already.
	ErrAlreadyExists = errors.New("already exists")
	// ErrDeleted: the object was removed; its record is never written again.
	ErrDeleted = errors.New("object was removed")
	// ErrInvalidTransition: a status change the state machine forbids.
	ErrInvalidTransition = errors.New("invalid state transition")
)

// MinPrefix is the shortest ID prefix that resolves to an object (any, as
// containerd resolves its own IDs: so a prefix means the same on both sides).
const MinPrefix = 1

var idPattern = regexp.MustCompile(`^[0-9a-f]{64}$`)

// ValidID reports whether id has the form unilet gives IDs (64 lower-case
// hex digits). Records whose ID is not of this form are never trusted.
func ValidID(id string) bool { return idPattern.MatchString(id) }

// Saver writes an object's record (metadata and status) durably; Delete
// removes it. A nil Saver keeps objects in memory only (unit tests).
type Saver[M, S any] interface {
	Save(id string, meta M, status S) error
	Delete(id string) error
}

// Object is one stored sandbox or container.
type Object[M, S any] struct {
	id   string
	meta M
	// Lifecycle serialises the verbs that change the object (start, stop,
	// remove, ...); readers never take it.
	Lifecycle sync.Mutex

	// wmu serialises writers (Update, Delete) across their disk write; mu
	// guards status and deleted, held by writers only for the swap.
	wmu     sync.Mutex
	mu      sync.RWMutex
	status  S
	deleted bool
	saver   Saver[M, S]
}

// ID is the object's ID.
func (o *Object[M, S]) ID() string { return o.id }

// Meta is the object's immutable metadata.
func (o *Object[M, S]) Meta() M { return o.meta }

// Status returns a copy of the current status.
func (o *Object[M, S]) Status() S {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.status
}

// Deleted reports whether the object was removed.
func (o *Object[M, S]) Deleted() bool {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.deleted
}

// Update changes the status through fn: the new status is written to disk
// first and becomes visible only once that succeeded, so memory never shows
// what a restarted daemon would not find. fn's error (or a failed write)
// leaves the status unchanged. A removed object is never written again.
func (o *Object[M, S]) Update(fn func(S) (S, error)) error {
	o.wmu.Lock()
	defer o.wmu.Unlock()
	o.mu.RLock()
	cur, deleted := o.status, o.deleted
	o.mu.RUnlock()
	if deleted {
		return fmt.Errorf("%s: %w", o.id, ErrDeleted)
	}
	next, err := fn(cur)
	if err != nil {
		return err
	}
	if o.saver != nil {
		if err := o.saver.Save(o.id, o.meta, next); err != nil {
			return fmt.Errorf("persist %s: %w", o.id, err)
		}
	}
	o.mu.Lock()
	o.status = next
	o.mu.Unlock()
	return nil
}

// Save writes the current status again (e.g. once a record was quarantined
// or restored from elsewhere).
func (o *Object[M, S]) Save() error { return o.Update(func(s S) (S, error) { return s, nil }) }

// Store is a set of objects indexed by ID, with prefix lookup.
type Store[M, S any] struct {
	kind  string
	saver Saver[M, S]
	mu    sync.RWMutex
	m     map[string]*Object[M, S]
	// adding holds the IDs whose record is being written (not yet visible).
	adding map[string]bool
}

// New returns an empty store; kind names its objects in errors ("container").
func New[M, S any](kind string, saver Saver[M, S]) *Store[M, S] {
	return &Store[M, S]{kind: kind, saver: saver, m: map[string]*Object[M, S]{}, adding: map[string]bool{}}
}

// Add writes a new object's record and then makes it visible. The ID is
// reserved while the record is written, without holding the map's lock.
func (s *Store[M, S]) Add(id string, meta M, status S) (*Object[M, S], error) {
	o := &Object[M, S]{id: id, meta: meta, status: status, saver: s.saver}
	s.mu.Lock()
	if _, ok := s.m[id]; ok || s.adding[id] {
		s.mu.Unlock()
		return nil, fmt.Errorf("%s %s: %w", s.kind, id, ErrAlreadyExists)
	}
	s.adding[id] = true
	s.mu.Unlock()
	var err error
	if s.saver != nil {
		if err = s.saver.Save(id, meta, status); err != nil {
			err = fmt.Errorf("persist %s %s: %w", s.kind, id, err)
		}
	}
	s.mu.Lock()
	delete(s.adding, id)
	if err == nil {
		s.m[id] = o
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return o, nil
}

// Restore puts an object loaded from disk into the store without writing it.
func (s *Store[M, S]) Restore(id string, meta M, status S) *Object[M, S] {
	o := &Object[M, S]{id: id, meta: meta, status: status, saver: s.saver}
	s.mu.Lock()
	s.m[id] = o
	s.mu.Unlock()
	return o
}

// Get finds an object by ID or unique prefix (at least MinPrefix characters).
func (s *Store[M, S]) Get(id string) (*Object[M, S], error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if o, ok := s.m[id]; ok {
		return o, nil
	}
	var found *Object[M, S]
	if len(id) >= MinPrefix {
		for k, o := range s.m {
			if strings.HasPrefix(k, id) {
				if found != nil {
					return nil, fmt.Errorf("%s ID prefix %q: %w", s.kind, id, ErrAmbiguous)
				}
				found = o
			}
		}
	}
	if found == nil {
		return nil, fmt.Errorf("%s %q: %w", s.kind, id, ErrNotFound)
	}
	return found, nil
}

// Match reports whether id names an object exactly, or as a prefix (found),
// and ErrAmbiguous when it is a prefix of several.
func (s *Store[M, S]) Match(id string) (exact, found bool, err error) {
	o, err := s.Get(id)
	if errors.Is(err, ErrNotFound) {
		return false, false, nil
	}
	if err != nil {
		return false, false, err
	}
	return o.id == id, true, nil
}

// Has reports whether id (or a unique prefix of one) names an object.
func (s *Store[M, S]) Has(id string) bool {
	o, err := s.Get(id)
	return err == nil && o != nil
}

// List returns every object, ordered by ID.
func (s *Store[M, S]) List() []*Object[M, S] {
	s.mu.RLock()
	out := make([]*Object[M, S], 0, len(s.m))
	for _, o := range s.m {
		out = append(out, o)
	}
	s.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out
}

// Delete removes the object's record and then the object; from then on its
// status can no longer be written. A failed record deletion keeps it.
func (s *Store[M, S]) Delete(o *Object[M, S]) error {
	o.wmu.Lock()
	defer o.wmu.Unlock()
	if o.Deleted() {
		return nil
	}
	if s.saver != nil {
		if err := s.saver.Delete(o.id); err != nil {
			return fmt.Errorf("delete the record of %s %s: %w", s.kind, o.id, err)
		}
	}
	o.mu.Lock()
	o.deleted = true
	o.mu.Unlock()
	s.mu.Lock()
	delete(s.m, o.id)
	s.mu.Unlock()
	return nil
}

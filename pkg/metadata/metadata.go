// Package metadata is unilet's persistent store of unikernel sandboxes and
// containers (bbolt under --root). Records are JSON; CRI configs inside them
// are kept as protobuf bytes by the caller. It is what lets ID-only CRI calls
// be routed, and exit statuses be reported, across daemon restarts.
package metadata

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	bucketSandboxes  = []byte("sandboxes")
	bucketContainers = []byte("containers")
)

// Store is the metadata database.
type Store struct{ db *bolt.DB }

// Open opens (creating) the database in dir.
func Open(dir string) (*Store, error) { return open(dir, 5*time.Second) }

// openWithTimeout is Open with a short lock timeout (tests).
func openWithTimeout(dir string) (*Store, error) { return open(dir, 100*time.Millisecond) }

func open(dir string, lockTimeout time.Duration) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	db, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, &bolt.Options{Timeout: lockTimeout})
	if err != nil {
		return nil, fmt.Errorf("open metadata store (is another unilet running on this --root?): %w", err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketSandboxes, bucketContainers} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

func (s *Store) put(bucket []byte, id string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Put([]byte(id), b) })
}

func (s *Store) del(bucket []byte, id string) error {
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Delete([]byte(id)) })
}

func (s *Store) each(bucket []byte, fn func(v []byte) error) error {
	return s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucket).ForEach(func(k, v []byte) error { return fn(v) })
	})
}

// PutSandbox stores a sandbox record under id.
func (s *Store) PutSandbox(id string, v any) error { return s.put(bucketSandboxes, id, v) }

// DeleteSandbox removes a sandbox record.
func (s *Store) DeleteSandbox(id string) error { return s.del(bucketSandboxes, id) }

// EachSandbox calls fn with every sandbox record.
func (s *Store) EachSandbox(fn func(v []byte) error) error { return s.each(bucketSandboxes, fn) }

// PutContainer stores a container record under id.
func (s *Store) PutContainer(id string, v any) error { return s.put(bucketContainers, id, v) }

// DeleteContainer removes a container record.
func (s *Store) DeleteContainer(id string) error { return s.del(bucketContainers, id) }

// EachContainer calls fn with every container record.
func (s *Store) EachContainer(fn func(v []byte) error) error { return s.each(bucketContainers, fn) }

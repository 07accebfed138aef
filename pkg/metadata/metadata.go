// Package metadata is unilet's persistent store of unikernel sandboxes and
// containers (bbolt under --root). Records are JSON; CRI configs inside them
// are kept as protobuf bytes by the caller. It is what lets ID-only CRI calls
// be routed, and exit statuses be reported, across daemon restarts.
//
// The file is never trusted to be intact: a database bbolt cannot read (a
// torn or corrupted page, a zero-length file) is moved aside with a loud
// error and a fresh one is started (Recovered says so, and the caller
// rebuilds what it can); a record the caller cannot decode is moved to a
// quarantine bucket, kept for the operator, and skipped.
package metadata

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

var (
	bucketSandboxes  = []byte("sandboxes")
	bucketContainers = []byte("containers")
	bucketQuarantine = []byte("quarantine")
)

// FileName is the database's name in its directory.
const FileName = "meta.db"

// Store is the metadata database.
type Store struct {
	db        *bolt.DB
	recovered string
}

// Open opens (creating) the database in dir.
func Open(dir string) (*Store, error) { return open(dir, 5*time.Second) }

// openWithTimeout is Open with a short lock timeout (tests).
func openWithTimeout(dir string) (*Store, error) { return open(dir, 100*time.Millisecond) }

func open(dir string, lockTimeout time.Duration) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	db, recovered, err := OpenDB(filepath.Join(dir, FileName), lockTimeout, bucketSandboxes, bucketContainers, bucketQuarantine)
	if err != nil {
		return nil, err
	}
	if recovered != "" {
		logrus.WithField("problem", recovered).Error(
			"the metadata store was corrupted and a new one started; unilet rebuilds what it can from the running VMs. " +
				"Pods whose VMs were not running are no longer known to this node (kubelet recreates them)")
	}
	return &Store{db: db, recovered: recovered}, nil
}

// OpenDB opens the bbolt file at path with the given buckets, proving
// every page readable. A file bbolt cannot read (a torn or corrupted page, a
// zero-length file) is renamed to <path>.corrupt-<time> and a new one is
// created; recovered then says what was wrong and where the old file went.
// A file locked by another process is an error (never moved aside).
func OpenDB(path string, lockTimeout time.Duration, buckets ...[]byte) (db *bolt.DB, recovered string, err error) {
	reason := ""
	if fi, err := os.Stat(path); err == nil && fi.Size() == 0 {
		reason = "the file is empty (zero length)"
	}
	if reason == "" {
		db, err := openChecked(path, lockTimeout, buckets)
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, "", fmt.Errorf("open %s (is another unilet running on this --root?): %w", path, err)
		}
		if err == nil {
			db, err = compactIfSparse(db, path, lockTimeout, buckets)
		}
		if err == nil {
			return db, "", nil
		}
		reason = err.Error()
	}
	aside := fmt.Sprintf("%s.corrupt-%s", path, time.Now().UTC().Format("20060102T150405.000000000Z"))
	if err := os.Rename(path, aside); err != nil {
		return nil, "", fmt.Errorf("%s is corrupted (%s) and cannot be moved aside: %w", path, reason, err)
	}
	logrus.WithFields(logrus.Fields{"path": path, "movedTo": aside, "problem": reason}).Error("a database is corrupted: moved it aside and started a new one")
	db, err = openChecked(path, lockTimeout, buckets)
	if err != nil {
		return nil, "", fmt.Errorf("open a new %s: %w", path, err)
	}
	return db, fmt.Sprintf("%s (old file kept as %s)", reason, aside), nil
}

// Compaction thresholds: a file of at least CompactMinBytes with more than
// half of its pages free is rewritten at open. bbolt reuses free pages but
// never shrinks its file, so a burst of large records once deleted would
// keep the file at its high-water mark for good.
const (
	CompactMinBytes = 4 << 20
	compactTxBytes  = 16 << 20
)

// compactIfSparse rewrites db's file when it is mostly free pages (bbolt's
// Compact into <path>.compact, then a rename over path) and returns the
// database to use: db itself when nothing was done or the copy failed
// (logged; the file is untouched), else the compacted file, opened and
// checked like any other.
func compactIfSparse(db *bolt.DB, path string, lockTimeout time.Duration, buckets [][]byte) (*bolt.DB, error) {
	var size int64
	_ = db.View(func(tx *bolt.Tx) error {
		size = tx.Size()
		return nil
	})
	st := db.Stats()
	free := int64(st.FreePageN+st.PendingPageN) * int64(db.Info().PageSize)
	if size < CompactMinBytes || free*2 < size {
		return db, nil
	}
	log := logrus.WithFields(logrus.Fields{"path": path, "bytes": size, "freeBytes": free})
	tmp := path + ".compact"
	_ = os.Remove(tmp)
	dst, err := bolt.Open(tmp, 0o600, &bolt.Options{Timeout: lockTimeout})
	if err == nil {
		err = bolt.Compact(dst, db, compactTxBytes)
		if cerr := dst.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		log.WithError(err).Warn("compacting a database failed; going on with it as it is")
		return db, nil
	}
	_ = db.Close()
	if db, err = openChecked(path, lockTimeout, buckets); err != nil {
		return nil, err
	}
	if fi, err := os.Stat(path); err == nil {
		log.WithField("newBytes", fi.Size()).Info("compacted a database that was mostly free space")
	}
	return db, nil
}

// openChecked opens the file and proves every page readable: bbolt panics
// on some corruptions, which is turned into an error here.
func openChecked(path string, lockTimeout time.Duration, buckets [][]byte) (db *bolt.DB, err error) {
	defer func() {
		if p := recover(); p != nil {
			if db != nil {
				_ = db.Close()
			}
			db, err = nil, fmt.Errorf("unreadable database: %v", p)
		}
	}()
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: lockTimeout})
	if err != nil {
		return nil, err
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for e := range tx.Check() {
			return fmt.Errorf("consistency check: %w", e)
		}
		for _, b := range buckets {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	return db, nil
}

// Recovered is non-empty when Open found the database corrupted and started
// a new one; it says what was wrong and where the old file went.
func (s *Store) Recovered() string { return s.recovered }

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

// each calls fn with copies of every key and value (fn may write to the
// store). A page bbolt cannot read ends the walk with an error.
func (s *Store) each(bucket []byte, fn func(k, v []byte) error) (err error) {
	type kv struct{ k, v []byte }
	var all []kv
	func() {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("read %s: unreadable page: %v", bucket, p)
			}
		}()
		err = s.db.View(func(tx *bolt.Tx) error {
			return tx.Bucket(bucket).ForEach(func(k, v []byte) error {
				all = append(all, kv{append([]byte(nil), k...), append([]byte(nil), v...)})
				return nil
			})
		})
	}()
	if err != nil {
		return err
	}
	for _, e := range all {
		if err := fn(e.k, e.v); err != nil {
			return err
		}
	}
	return nil
}

// Quarantined is a record moved out of the way because it could not be used.
type Quarantined struct {
	Bucket string          `json:"bucket"`
	Key    string          `json:"key"`
	Reason string          `json:"reason"`
	At     time.Time       `json:"at"`
	Raw    json.RawMessage `json:"raw,omitempty"`
	Bytes  []byte          `json:"bytes,omitempty"` // the record when it is not JSON
}

func (s *Store) quarantine(bucket []byte, key, raw []byte, reason string) error {
	q := Quarantined{Bucket: string(bucket), Key: string(key), Reason: reason, At: time.Now().UTC()}
	if json.Valid(raw) {
		q.Raw = raw
	} else {
		q.Bytes = raw
	}
	b, err := json.Marshal(q)
	if err != nil {
		return err
	}
	qkey := fmt.Sprintf("%s/%s/%d", bucket, key, time.Now().UnixNano())
	return s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketQuarantine).Put([]byte(qkey), b); err != nil {
			return err
		}
		return tx.Bucket(bucket).Delete(key)
	})
}

// Quarantine lists the quarantined records.
func (s *Store) Quarantine() ([]Quarantined, error) {
	var out []Quarantined
	err := s.each(bucketQuarantine, func(_, v []byte) error {
		var q Quarantined
		if json.Unmarshal(v, &q) == nil {
			out = append(out, q)
		}
		return nil
	})
	return out, err
}

// PutSandbox stores a sandbox record under id.
func (s *Store) PutSandbox(id string, v any) error { return s.put(bucketSandboxes, id, v) }

// DeleteSandbox removes a sandbox record.
func (s *Store) DeleteSandbox(id string) error { return s.del(bucketSandboxes, id) }

// EachSandbox calls fn with every sandbox record and its key.
func (s *Store) EachSandbox(fn func(k, v []byte) error) error { return s.each(bucketSandboxes, fn) }

// QuarantineSandbox moves the sandbox record under key to the quarantine.
func (s *Store) QuarantineSandbox(key, raw []byte, reason string) error {
	return s.quarantine(bucketSandboxes, key, raw, reason)
}

// PutContainer stores a container record under id.
func (s *Store) PutContainer(id string, v any) error { return s.put(bucketContainers, id, v) }

// DeleteContainer removes a container record.
func (s *Store) DeleteContainer(id string) error { return s.del(bucketContainers, id) }

// EachContainer calls fn with every container record and its key.
func (s *Store) EachContainer(fn func(k, v []byte) error) error { return s.each(bucketContainers, fn) }

// QuarantineContainer moves the container record under key to the quarantine.
func (s *Store) QuarantineContainer(key, raw []byte, reason string) error {
	return s.quarantine(bucketContainers, key, raw, reason)
}

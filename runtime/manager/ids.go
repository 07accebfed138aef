package manager

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/unilet-dev/unilet/runtime"
	"github.com/unilet-dev/unilet/runtime/shim"
)

// JailIDs is the range of uids (and equal gids) jailed VMs run as: each
// live VM has one of its own, so no two QEMUs can signal, trace or read each
// other, and none is the uid of anything else on the node.
type JailIDs struct {
	First uint32
	Count uint32
}

// DefaultJailIDs: 65536 ids from 2^30, far above system and login users and
// the subordinate ranges Debian hands out from 100000.
var DefaultJailIDs = JailIDs{First: 1 << 30, Count: 65536}

// Validate checks the range is usable: never uid 0, no overflow.
func (r JailIDs) Validate() error {
	if r.First == 0 || r.Count == 0 || uint64(r.First)+uint64(r.Count) > 1<<32-1 {
		return fmt.Errorf("jail id range %d+%d: want a non-empty range above 0 below 2^32-1", r.First, r.Count)
	}
	return nil
}

// idPool hands out jail ids; ids of VMs an earlier daemon started are read
// once from their spec.json files.
type idPool struct {
	mu     sync.Mutex
	r      JailIDs
	loaded bool
	used   map[uint32]string // id → VM directory name
	next   uint32
}

// ErrNoJailID: every id of the range is in use.
var ErrNoJailID = errors.New("no free uid in the jail id range (--jail-ids): too many VMs for it")

func (p *idPool) take(vmRoot, dirName string) (uint32, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.loaded {
		p.load(vmRoot)
	}
	for i := uint32(0); i < p.r.Count; i++ {
		id := p.r.First + (p.next+i)%p.r.Count
		if _, busy := p.used[id]; !busy {
			p.used[id] = dirName
			p.next = (p.next + i + 1) % p.r.Count
			return id, nil
		}
	}
	return 0, ErrNoJailID
}

func (p *idPool) release(dirName string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, d := range p.used {
		if d == dirName {
			delete(p.used, id)
		}
	}
}

// load records the ids of the VM directories present (their spec.json).
func (p *idPool) load(vmRoot string) {
	p.used, p.loaded = map[uint32]string{}, true
	ents, _ := os.ReadDir(vmRoot)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(vmRoot, e.Name(), shim.SpecFile))
		if err != nil {
			continue
		}
		var spec runtime.VMSpec
		if json.Unmarshal(b, &spec) == nil && spec.Jail != nil {
			p.used[spec.Jail.UID] = e.Name()
		}
	}
}

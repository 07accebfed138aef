package manager

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/unilet-dev/unilet/vmm"
	"github.com/unilet-dev/unilet/vmm/shim"
)

// JailIDs is the range of uids (and equal gids) jailed VMs run as: each
// live pod's VMs have one of their own, so no QEMU can signal, trace or
// read another pod's, and none is the uid of anything else on the node.
// The VMs of one pod share it, as the containers of a pod share volumes:
// 9p lets a guest truncate or set the times of a file on the host only if
// its QEMU owns it, so a shared group alone would not do (docs/security.md).
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
	used   map[uint32]map[string]bool // id → the VM directories using it
	pods   map[string]uint32          // pod → the id its VMs share
	next   uint32
}

// ErrNoJailID: every id of the range is in use.
var ErrNoJailID = errors.New("no free uid in the jail id range (--jail-ids): too many VMs for it")

// take hands VM directory dirName the id of its pod ("" = a pod of its
// own): the one the pod's running VMs have, else a free one.
func (p *idPool) take(vmRoot, dirName, pod string) (uint32, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.loaded {
		p.load(vmRoot)
	}
	if id, ok := p.pods[pod]; ok && pod != "" {
		p.hold(id, dirName, pod)
		return id, nil
	}
	for i := uint32(0); i < p.r.Count; i++ {
		id := p.r.First + (p.next+i)%p.r.Count
		if len(p.used[id]) > 0 {
			continue
		}
		p.next = (p.next + i + 1) % p.r.Count
		p.hold(id, dirName, pod)
		return id, nil
	}
	return 0, ErrNoJailID
}

// hold records that dirName uses id, pod's id.
func (p *idPool) hold(id uint32, dirName, pod string) {
	if p.used[id] == nil {
		p.used[id] = map[string]bool{}
	}
	p.used[id][dirName] = true
	if pod != "" {
		p.pods[pod] = id
	}
}

// join makes id, which dirName holds already (a warm clone's, made before
// its pod), pod's id unless the pod has one.
func (p *idPool) join(vmRoot, dirName, pod string, id uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.loaded {
		p.load(vmRoot)
	}
	if _, ok := p.pods[pod]; pod != "" && !ok && p.used[id][dirName] {
		p.pods[pod] = id
	}
}

func (p *idPool) release(dirName string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, dirs := range p.used {
		delete(dirs, dirName)
		if len(dirs) == 0 {
			delete(p.used, id)
		}
	}
	for pod, id := range p.pods {
		if len(p.used[id]) == 0 {
			delete(p.pods, pod)
		}
	}
}

// load records the ids of the VM directories present (their spec.json).
func (p *idPool) load(vmRoot string) {
	p.used, p.pods, p.loaded = map[uint32]map[string]bool{}, map[string]uint32{}, true
	ents, _ := os.ReadDir(vmRoot)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(vmRoot, e.Name(), shim.SpecFile))
		if err != nil {
			continue
		}
		var spec vmm.VMSpec
		if json.Unmarshal(b, &spec) == nil && spec.Jail != nil {
			p.hold(spec.Jail.UID, e.Name(), spec.Jail.Pod)
		}
	}
}

package store

import (
	"fmt"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// ContainerState is a unikernel container's lifecycle phase:
//
//	Created ──start──▶ Starting ──▶ Running ──stop──▶ Stopping ──▶ Exited
//	   │                  │            │                  │           │
//	   └──stop───────────▶│◀───────────┴── VM ends ───────┴──────────▶│
//	   (NeverStarted)     └── start failed ──────────────────────────▶│
//	Created, Exited ──remove──▶ Removing ──▶ (record deleted)
//
// Starting and Stopping are recorded before the shim is asked, so a daemon
// that dies in the middle finds the VM directory to reconcile; Removing is
// recorded before anything is torn down, so a removed container never
// comes back after a restart.
type ContainerState string

// Container states.
const (
	ContainerCreated  ContainerState = "created"
	ContainerStarting ContainerState = "starting"
	ContainerRunning  ContainerState = "running"
	ContainerStopping ContainerState = "stopping"
	ContainerExited   ContainerState = "exited"
	ContainerRemoving ContainerState = "removing"
)

var containerTransitions = map[ContainerState][]ContainerState{
	ContainerCreated:  {ContainerStarting, ContainerExited, ContainerRemoving},
	ContainerStarting: {ContainerRunning, ContainerExited},
	ContainerRunning:  {ContainerStopping, ContainerExited},
	// A stop that could not reach the shim leaves the VM running.
	ContainerStopping: {ContainerExited, ContainerRunning},
	ContainerExited:   {ContainerRemoving},
	ContainerRemoving: {},
}

// allowed reports whether table lets from become to.
func allowed[S comparable](table map[S][]S, from, to S) bool {
	for _, s := range table[from] {
		if s == to {
			return true
		}
	}
	return false
}

// CanBecome reports whether the state machine allows from → to.
func (from ContainerState) CanBecome(to ContainerState) bool {
	return allowed(containerTransitions, from, to)
}

// Check returns ErrInvalidTransition unless from → to is allowed.
func (from ContainerState) Check(to ContainerState) error {
	if from.CanBecome(to) {
		return nil
	}
	return fmt.Errorf("container %s cannot become %s: %w", from, to, ErrInvalidTransition)
}

// Valid reports whether s is one of the states.
func (s ContainerState) Valid() bool {
	_, ok := containerTransitions[s]
	return ok
}

// CRI is the state CRI clients see: a start in progress is still CREATED,
// a stop in progress still RUNNING, a removal in progress EXITED.
func (s ContainerState) CRI() runtimeapi.ContainerState {
	switch s {
	case ContainerCreated, ContainerStarting:
		return runtimeapi.ContainerState_CONTAINER_CREATED
	case ContainerRunning, ContainerStopping:
		return runtimeapi.ContainerState_CONTAINER_RUNNING
	case ContainerExited, ContainerRemoving:
		return runtimeapi.ContainerState_CONTAINER_EXITED
	}
	return runtimeapi.ContainerState_CONTAINER_UNKNOWN
}

// Live reports whether a VM may exist in this state.
func (s ContainerState) Live() bool {
	return s == ContainerStarting || s == ContainerRunning || s == ContainerStopping
}

// ContainerStateFromCRI maps the CRI state an earlier unilet recorded (it
// stored a start in progress as UNKNOWN).
func ContainerStateFromCRI(s runtimeapi.ContainerState) ContainerState {
	switch s {
	case runtimeapi.ContainerState_CONTAINER_CREATED:
		return ContainerCreated
	case runtimeapi.ContainerState_CONTAINER_RUNNING:
		return ContainerRunning
	case runtimeapi.ContainerState_CONTAINER_EXITED:
		return ContainerExited
	}
	return ContainerStarting
}

// SandboxState is a unikernel pod's lifecycle phase:
//
//	Creating ──network ready──▶ Ready ──stop──▶ NotReady ──remove──▶ Removing
//	    └── set-up failed, teardown pending ──▶ NotReady
//
// Creating is recorded before the network namespace exists, so a daemon
// that dies during CNI ADD leaves a record whose teardown the next one
// finishes.
type SandboxState string

// Sandbox states.
const (
	SandboxCreating SandboxState = "creating"
	SandboxReady    SandboxState = "ready"
	SandboxNotReady SandboxState = "notready"
	SandboxRemoving SandboxState = "removing"
)

var sandboxTransitions = map[SandboxState][]SandboxState{
	SandboxCreating: {SandboxReady, SandboxNotReady, SandboxRemoving},
	SandboxReady:    {SandboxNotReady},
	SandboxNotReady: {SandboxRemoving},
	SandboxRemoving: {},
}

// CanBecome reports whether the state machine allows from → to.
func (from SandboxState) CanBecome(to SandboxState) bool {
	return allowed(sandboxTransitions, from, to)
}

// Check returns ErrInvalidTransition unless from → to is allowed.
func (from SandboxState) Check(to SandboxState) error {
	if from.CanBecome(to) {
		return nil
	}
	return fmt.Errorf("pod sandbox %s cannot become %s: %w", from, to, ErrInvalidTransition)
}

// Valid reports whether s is one of the states.
func (s SandboxState) Valid() bool {
	_, ok := sandboxTransitions[s]
	return ok
}

// CRI is the state CRI clients see.
func (s SandboxState) CRI() runtimeapi.PodSandboxState {
	if s == SandboxReady {
		return runtimeapi.PodSandboxState_SANDBOX_READY
	}
	return runtimeapi.PodSandboxState_SANDBOX_NOTREADY
}

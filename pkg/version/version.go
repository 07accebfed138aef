// Package version holds the build version stamped in by the Makefile.
package version

// Version is set with -ldflags "-X github.com/unilet-dev/unilet/pkg/version.Version=…".
var Version = "dev"

//go:build race

package cri_test

// raceBuild: the tests run with -race, so the daemon and shims they start
// are built with it too, and any race they report fails the test.
const raceBuild = true

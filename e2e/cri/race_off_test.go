//go:build !race

package cri_test

const raceBuild = false

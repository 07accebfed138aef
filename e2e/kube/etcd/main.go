// Command etcd is etcd built from Go modules for the e2e cluster (the
// upstream etcd main, nothing added).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }

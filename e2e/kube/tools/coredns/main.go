// Command coredns is CoreDNS with the plugins the e2e cluster's DNS needs.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
)

// The plugins' order in a server block is this one (CoreDNS's plugin.cfg
// order for these).
func init() {
	dnsserver.Directives = []string{"bind", "errors", "log", "loadbalance", "cache", "kubernetes"}
}

func main() { coremain.Run() }

// Command nnp stands in for the suite's nonewprivs image: installed setuid
// root, it prints the effective uid it runs with, which is 0 unless the
// container has no_new_privs.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printf("Effective uid: %d\n", os.Geteuid())
}

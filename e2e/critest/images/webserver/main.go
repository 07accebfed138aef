// Command webserver stands in for the web server images the CRI validation
// suite (critest) uses: nginx, httpd and hostnet-nginx. It serves a page on
// $PORT (default 80); installed as nginx it also writes /var/run/nginx.pid as
// nginx does. It logs its name, which the suite looks for.
package main

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
)

func main() {
	name := filepath.Base(os.Args[0])
	port := os.Getenv("PORT")
	if port == "" {
		port = "80"
	}
	if name == "nginx" {
		_ = os.MkdirAll("/var/run", 0o755)
		if err := os.WriteFile("/var/run/nginx.pid", []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}
	fmt.Printf("%s: serving on :%s\n", name, port)
	http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "<html><body><h1>It works! (%s stand-in)</h1></body></html>\n", name)
	})
	if err := http.ListenAndServe(":"+port, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

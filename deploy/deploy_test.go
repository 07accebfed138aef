// Package deploy holds the manifests and the Helm chart; this test keeps the
// chart's defaults and the plain manifests the same content.
package deploy

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"text/template"

	toml "github.com/pelletier/go-toml/v2"
	"github.com/stretchr/testify/require"
	"github.com/unilet-dev/unilet/pkg/config"
	"go.yaml.in/yaml/v3"
)

// render renders one chart template with values the way Helm does for the
// features the chart uses (.Values, quote).
func render(t *testing.T, file string, values map[string]any) string {
	tpl, err := template.New(filepath.Base(file)).Funcs(template.FuncMap{
		"quote": func(v any) string { return strconv.Quote(fmt.Sprint(v)) },
		"toToml": func(v any) string {
			b, err := toml.Marshal(v)
			require.NoError(t, err)
			return string(b)
		},
	}).ParseFiles(file)
	require.NoError(t, err)
	var b strings.Builder
	require.NoError(t, tpl.Execute(&b, map[string]any{"Values": values}))
	return b.String()
}

func TestHelmChartMatchesManifests(t *testing.T) {
	raw, err := os.ReadFile("helm/unilet/values.yaml")
	require.NoError(t, err)
	values := map[string]any{}
	require.NoError(t, yaml.Unmarshal(raw, &values))
	var all []string
	for _, f := range []string{"namespace.yaml", "serviceaccount.yaml", "rbac.yaml", "configmap.yaml", "daemonset.yaml"} {
		all = append(all, render(t, filepath.Join("helm/unilet/templates", f), values))
	}
	rendered := strings.Split(strings.Join(all, "---\n"), "---\n")
	plain, err := os.ReadFile("unilet.yaml")
	require.NoError(t, err)
	docs := strings.Split(string(plain), "---\n")
	require.Len(t, docs, 6)
	require.Len(t, rendered, 6)
	for i := range docs {
		require.Equal(t, normalize(docs[i]), normalize(rendered[i]), "document %d", i)
	}
	rc := render(t, "helm/unilet/templates/runtimeclass.yaml", values)
	want, err := os.ReadFile("runtimeclass.yaml")
	require.NoError(t, err)
	require.Equal(t, normalize(string(want)), normalize(rc))
	// Every manifest parses.
	for _, f := range []string{"unilet.yaml", "runtimeclass.yaml", "examples/pod-annotation.yaml", "examples/pod-runtimeclass.yaml",
		"examples/demo.yaml", "examples/web.yaml", "examples/pod-pvc.yaml", "examples/service-deployment.yaml", "examples/statefulset.yaml"} {
		b, err := os.ReadFile(f)
		require.NoError(t, err, f)
		dec := yaml.NewDecoder(strings.NewReader(string(b)))
		for {
			var v map[string]any
			if err := dec.Decode(&v); err != nil {
				require.EqualError(t, err, "EOF", f)
				break
			}
			require.NotEmpty(t, v["kind"], f)
		}
	}
}

// normalize parses YAML and re-encodes it (comments and quoting style aside).
func normalize(s string) string {
	var v any
	if err := yaml.Unmarshal([]byte(s), &v); err != nil {
		return "invalid YAML: " + err.Error()
	}
	b, _ := yaml.Marshal(v)
	return string(b)
}

// The chart's config value becomes a file the daemon accepts as it is.
func TestHelmConfigRendersDaemonConfig(t *testing.T) {
	values := map[string]any{"config": map[string]any{
		"debug":   map[string]any{"format": "json", "level": "debug"},
		"metrics": map[string]any{"address": "127.0.0.1:9460"},
		"images":  map[string]any{"mirrors": map[string]any{"docker.io": "mirror.internal:5000"}},
	}}
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	require.NoError(t, yaml.Unmarshal([]byte(render(t, "helm/unilet/templates/configmap.yaml", values)), &cm))
	c := config.Default()
	require.NoError(t, c.Decode([]byte(cm.Data["config.toml"])))
	require.NoError(t, c.Validate())
	require.Equal(t, "json", c.Debug.Format)
	require.Equal(t, "127.0.0.1:9460", c.Metrics.Address)
	require.Equal(t, map[string]string{"docker.io": "mirror.internal:5000"}, c.Images.Mirrors)
}

// The ServiceMonitor is off by default and, on, scrapes the metrics port.
func TestHelmServiceMonitor(t *testing.T) {
	off := map[string]any{"serviceMonitor": map[string]any{"enabled": false, "port": 9460, "interval": "30s", "labels": map[string]any{}}}
	require.Empty(t, strings.TrimSpace(render(t, "helm/unilet/templates/servicemonitor.yaml", off)))
	on := map[string]any{"serviceMonitor": map[string]any{"enabled": true, "port": 9460, "interval": "15s", "labels": map[string]any{"release": "prom"}}}
	dec := yaml.NewDecoder(strings.NewReader(render(t, "helm/unilet/templates/servicemonitor.yaml", on)))
	var svc, sm map[string]any
	require.NoError(t, dec.Decode(&svc))
	require.NoError(t, dec.Decode(&sm))
	require.Equal(t, "Service", svc["kind"])
	require.Equal(t, 9460, svc["spec"].(map[string]any)["ports"].([]any)[0].(map[string]any)["port"])
	require.Equal(t, "ServiceMonitor", sm["kind"])
	require.Equal(t, "prom", sm["metadata"].(map[string]any)["labels"].(map[string]any)["release"])
	ep := sm["spec"].(map[string]any)["endpoints"].([]any)[0].(map[string]any)
	require.Equal(t, "metrics", ep["port"])
	require.Equal(t, "15s", ep["interval"])
}

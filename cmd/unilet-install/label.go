package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The readiness label (kata-deploy's pattern): the installer sets it on its
// node once the daemon answers on its CRI socket and removes it when the
// installer ends (DaemonSet deleted, or rolled: the next installer sets it
// again); RuntimeClass unikraft schedules only to nodes carrying it.
const (
	serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"
	labelTimeout      = 4 * time.Second // within the pod's 10 s grace period
	readyPoll         = time.Second
)

// kubeAPI is the little of the Kubernetes API the installer uses: a merge
// patch of its node's labels, as its service account (in-cluster config).
type kubeAPI struct {
	base      string
	tokenFile string
	client    *http.Client
}

// inCluster is the API server the pod's environment names, trusted through
// the service account's CA.
func inCluster() (*kubeAPI, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, errors.New("KUBERNETES_SERVICE_HOST/PORT are not set (not running in a pod?)")
	}
	ca, err := os.ReadFile(serviceAccountDir + "/ca.crt")
	if err != nil {
		return nil, fmt.Errorf("the service account's CA (is its token mounted?): %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, errors.New("the service account's ca.crt holds no certificate")
	}
	return &kubeAPI{
		base:      "https://" + net.JoinHostPort(host, port),
		tokenFile: serviceAccountDir + "/token",
		client: &http.Client{Timeout: labelTimeout, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}},
	}, nil
}

// labelPatch is the JSON merge patch setting label key to value, or
// removing it (value nil).
func labelPatch(key string, value *string) []byte {
	b, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]*string{key: value}}})
	return b
}

// labelNode sets (value non-nil) or removes node's label key.
func (k *kubeAPI) labelNode(ctx context.Context, node, key string, value *string) error {
	token, err := os.ReadFile(k.tokenFile) // re-read: the kubelet rotates it
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPatch, k.base+"/api/v1/nodes/"+url.PathEscape(node), bytes.NewReader(labelPatch(key, value)))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/merge-patch+json")
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := k.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("PATCH node %s: %s: %s", node, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

// daemonAnswers reports whether unilet answers CRI Version on socket (a
// host path, reached through the host's / at hostRoot).
func daemonAnswers(ctx context.Context, socketPath string) bool {
	conn, err := grpc.NewClient("unix://"+socketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return false
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err = runtimeapi.NewRuntimeServiceClient(conn).Version(ctx, &runtimeapi.VersionRequest{})
	return err == nil
}

// readiness labels the node once the daemon answers, then, when ctx ends,
// removes the label again. It returns when the label is removed (or
// labelling is off).
func (c config) readiness(ctx context.Context) {
	if c.nodeName == "" || c.readyLabel == "" {
		logrus.Info("no --node-name: the node's readiness label is left alone")
		return
	}
	log := logrus.WithFields(logrus.Fields{"node": c.nodeName, "label": c.readyLabel})
	api, err := inCluster()
	if err != nil {
		log.WithError(err).Error("cannot reach the Kubernetes API; the node is not labelled ready, so RuntimeClass unikraft pods are not scheduled here")
		return
	}
	socket := c.host(strings.TrimPrefix(c.socket, "unix://"))
	labelled := false
	for !labelled {
		if daemonAnswers(ctx, socket) {
			lctx, cancel := context.WithTimeout(ctx, labelTimeout)
			err := api.labelNode(lctx, c.nodeName, c.readyLabel, ptr("true"))
			cancel()
			if err == nil {
				labelled = true
				log.Info("unilet answers: node labelled ready")
				break
			}
			log.WithError(err).Warn("label the node ready; retrying")
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(readyPoll):
		}
	}
	<-ctx.Done()
	lctx, cancel := context.WithTimeout(context.Background(), labelTimeout)
	defer cancel()
	if err := api.labelNode(lctx, c.nodeName, c.readyLabel, nil); err != nil {
		log.WithError(err).Error("remove the node's readiness label")
		return
	}
	log.Info("installer ending: readiness label removed")
}

func ptr(s string) *string { return &s }

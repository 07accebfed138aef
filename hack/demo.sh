#!/bin/bash
# make demo: a single-node Kubernetes cluster on 127.0.0.1 whose kubelet runs
# pods through unilet; a unikernel pod and a plain pod, their status and the
# unikernel's console log. Tear down with `make demo-down`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=_output
KUBECONFIG_PATH=$OUT/cluster/kubeconfig
K="$OUT/kube/bin/kubectl --kubeconfig $KUBECONFIG_PATH"
step() { printf '\n\033[1m>> %s\033[0m\n' "$*"; }

step "building unilet, unilet-shim, unilet-jail, uniletctl"
make -s build
step "building Kubernetes v1.37.2 and etcd from Go modules (first time: ~10 minutes; then seconds)"
./e2e/kube/build.sh $OUT/kube/bin
go build -o $OUT/bin/cluster ./e2e/kube/cluster
step "starting the cluster: etcd, kube-apiserver, controller-manager, scheduler, kube-proxy, CoreDNS, containerd, unilet, kubelet"
$OUT/bin/cluster up --kube-bin $OUT/kube/bin --unilet-bin bin
# The cluster took free ports; its images are named 127.0.0.1:5000/… and its unilet fetches that name from the
# registry's real port (a registry mirror).
REG=127.0.0.1:$($OUT/bin/cluster port registry)
step "packing the test unikernel with uniletctl and pushing it to the cluster's registry ($REG, images named 127.0.0.1:5000/…)"
./e2e/guest/testkernel/build.sh $OUT/guest/testkernel.elf
bin/uniletctl pack --kernel $OUT/guest/testkernel.elf --push $REG/unikraft/hello:latest --insecure
step "building the network guest (a Linux kernel + busybox initrd, from Debian packages) and pushing it as unikraft/netguest"
./e2e/guest/netguest/build.sh $OUT/netguest
bin/uniletctl pack --kernel $OUT/netguest/vmlinuz --initrd $OUT/netguest/initrd.gz --kconfig internal/testimages/netguest.kconfig \
	--label dev.unilet.min-memory=128 --push $REG/unikraft/netguest:latest --insecure
step "kubectl apply -f deploy/examples/demo.yaml (a unikernel pod and a plain pod)"
$K apply -f deploy/examples/demo.yaml
$K wait --for=condition=Ready pod/hello-unikernel pod/hello-plain --timeout=180s
sleep 2
step "kubectl get pods -o wide"
$K get pods -o wide
step "kubectl logs hello-unikernel (the VM's serial console)"
$K logs hello-unikernel
step "kubectl logs hello-plain (a runc container in containerd, through unilet)"
$K logs hello-plain
step "kubectl apply -f deploy/examples/service-deployment.yaml (3 unikernel replicas behind Service web, 443 -> 8080)"
$K apply -f deploy/examples/service-deployment.yaml
$K rollout status deployment/web --timeout=300s
$K get pods -l app=web -o wide
$K get service web
ip=$($K get service web -o jsonpath='{.spec.clusterIP}')
step "six requests to the Service's ClusterIP ($ip:443) from this node: kube-proxy spreads them over the replicas"
for i in 1 2 3 4 5 6; do
	curl -s --max-time 5 "http://$ip:443/" || echo "(no answer)"
done
step "the Service by name through CoreDNS, from a plain pod: web.default.svc.cluster.local"
$OUT/kube/bin/kubectl --kubeconfig $KUBECONFIG_PATH run dns-check --rm -i --restart=Never --image=unilet.test/busybox:1 --image-pull-policy=Never \
	--overrides='{"spec":{"automountServiceAccountToken":false}}' -- busybox nslookup web.default.svc.cluster.local 2>/dev/null | grep -A1 '^Name' || true
cat <<MSG

The cluster keeps running. Try:
  export KUBECONFIG=$PWD/$KUBECONFIG_PATH; alias kubectl=$PWD/$OUT/kube/bin/kubectl
  kubectl logs -f hello-unikernel           # follow the console
  kubectl attach -it hello-unikernel        # the serial console; Ctrl-] detaches, the VM keeps running
  kubectl exec hello-unikernel -- ls        # refused: a unikernel has no processes to exec into
  kubectl scale deployment/web --replicas=5 # more unikernel replicas behind the Service
  bin/uniletctl --endpoint unix://$PWD/$OUT/cluster/unilet/unilet.sock ps   # this node's VMs (also inspect, logs, console, diag)
  kubectl apply -f deploy/examples/statefulset.yaml   # the StatefulSet example (k8s-0.k8s, ...)
Tear down: make demo-down
MSG

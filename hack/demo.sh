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
step "packing the test unikernel with uniletctl and pushing it to the cluster's registry (127.0.0.1:5000)"
./e2e/guest/testkernel/build.sh $OUT/guest/testkernel.elf
bin/uniletctl pack --kernel $OUT/guest/testkernel.elf --push 127.0.0.1:5000/unikraft/hello:latest --insecure
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
cat <<MSG

The cluster keeps running. Try:
  export KUBECONFIG=$PWD/$KUBECONFIG_PATH; alias kubectl=$PWD/$OUT/kube/bin/kubectl
  kubectl logs -f hello-unikernel           # follow the console
  kubectl attach -it hello-unikernel        # the serial console; Ctrl-] detaches, the VM keeps running
  kubectl exec hello-unikernel -- ls        # refused: a unikernel has no processes to exec into
Tear down: make demo-down
MSG

//go:build tools

// Package tools pins the node commands of the kind node image built from this
// module (kubelet, kubeadm, kube-proxy), so that `go mod tidy` keeps their
// dependencies in go.sum. It is never compiled.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubeadm"
	_ "k8s.io/kubernetes/cmd/kubelet"
)

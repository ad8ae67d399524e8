//go:build tools

// Package tools pins the etcd command built from this module, so that
// `go mod tidy` keeps its dependencies in go.sum. It is never compiled.
package tools

import _ "go.etcd.io/etcd/server/v3"

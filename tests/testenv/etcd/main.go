// Command etcd runs the etcd server from go.etcd.io/etcd/server/v3, the
// store behind the test control plane.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}

// Command daprd is a slim build of the Dapr sidecar for wasmsub's tests.
//
// Why this exists: this machine cannot run `dapr init` (no GitHub
// downloads), but the Go module proxy works, so scripts/get-daprd.sh builds
// daprd from the github.com/dapr/dapr release pinned in go.mod. Upstream's
// cmd/daprd registers every component behind the `stablecomponents` build
// tag, which drags in all cloud SDKs; this registers only what tests use.
// app.Run() imports upstream's component package, whose untagged stub
// (zz_notag.go) panics, so get-daprd.sh builds against a copy of the dapr
// module with that stub blanked: build through the script, not `go build`.
package main

import (
	pubsubmem "github.com/dapr/components-contrib/pubsub/in-memory"
	pubsubredis "github.com/dapr/components-contrib/pubsub/redis"
	statemem "github.com/dapr/components-contrib/state/in-memory"
	stateredis "github.com/dapr/components-contrib/state/redis"

	"github.com/dapr/dapr/cmd/daprd/app"
	pubsubLoader "github.com/dapr/dapr/pkg/components/pubsub"
	stateLoader "github.com/dapr/dapr/pkg/components/state"
)

func init() {
	pubsubLoader.DefaultRegistry.RegisterComponent(pubsubredis.NewRedisStreams, "redis")
	pubsubLoader.DefaultRegistry.RegisterComponent(pubsubmem.New, "in-memory")
	stateLoader.DefaultRegistry.RegisterComponent(stateredis.NewRedisStateStore, "redis")
	stateLoader.DefaultRegistry.RegisterComponent(statemem.NewInMemoryStateStore, "in-memory")
}

func main() {
	app.Run()
}

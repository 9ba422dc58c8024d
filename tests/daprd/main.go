// Command daprd is a slim build of the Dapr sidecar for wasmsub's tests.
//
// Why this exists: this machine cannot run `dapr init` (no GitHub
// downloads), but the Go module proxy works, so scripts/get-daprd.sh builds
// daprd from the github.com/dapr/dapr release pinned in go.mod. Upstream's
// cmd/daprd registers every component behind the `stablecomponents` build
// tag, which drags in all cloud SDKs; this registers only what tests use:
// Redis and in-memory, and the Kafka and AWS SNS/SQS pub/subs that
// tests/tests/brokers.rs runs against a real Kafka and moto.
// app.Run() imports upstream's component package, whose untagged stub
// (zz_notag.go) panics, so get-daprd.sh builds against a copy of the dapr
// module with that stub blanked: build through the script, not `go build`.
package main

import (
	pubsubsnssqs "github.com/dapr/components-contrib/pubsub/aws/snssqs"
	pubsubmem "github.com/dapr/components-contrib/pubsub/in-memory"
	pubsubkafka "github.com/dapr/components-contrib/pubsub/kafka"
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
	// As upstream's cmd/daprd/components/pubsub_kafka.go and
	// pubsub_aws_snssqs.go register them ("snssqs" is upstream's old alias).
	pubsubLoader.DefaultRegistry.RegisterComponent(pubsubkafka.NewKafka, "kafka")
	pubsubLoader.DefaultRegistry.RegisterComponent(pubsubsnssqs.NewSnsSqs, "aws.snssqs", "snssqs")
	stateLoader.DefaultRegistry.RegisterComponent(stateredis.NewRedisStateStore, "redis")
	stateLoader.DefaultRegistry.RegisterComponent(statemem.NewInMemoryStateStore, "in-memory")
}

func main() {
	app.Run()
}

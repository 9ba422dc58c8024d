#!/usr/bin/env bash
# Per-broker end-to-end figures (bench/e2e/brokers.py): the task-created
# component on a release wasmsub behind daprd, with Redis Streams, Kafka and
# SNS/SQS (moto) as the pub/sub. Builds and installs what it runs (release
# wasmsub, the guests, daprd, Kafka's jars, moto), all cached. Not part of the
# tests. Arguments go to brokers.py (--events, --latency-events, --brokers).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_cargo
cd "$root"
bash scripts/apt-install.sh redis-server
daprd="$(bash scripts/get-daprd.sh)"
kafka_lib="$(bash scripts/get-kafka.sh)"
moto_server="$(bash scripts/get-moto.sh)"
bash scripts/build-guests.sh "$root/target/guests"
cargo build --release --locked -p wasmsub --bin wasmsub
exec python3 bench/e2e/brokers.py --repo "$root" --daprd "$daprd" --wasmsub "$CARGO_TARGET_DIR/release/wasmsub" \
    --component "$root/target/guests/task_created.wasm" --kafka-lib "$kafka_lib" --moto-server "$moto_server" "$@"

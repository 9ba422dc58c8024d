#!/usr/bin/env bash
# The end-to-end benchmark (docs/BENCHMARKS.md): builds what it compares
# (release wasmsub, the native subscriber, the guests, daprd, a Python venv
# with the Dapr SDK) and runs bench/e2e/run.py. Not part of the tests.
#
# Prints, per subscriber, events/s (8 publishers through daprd), the rate at
# which it drains a backlog appended straight to the stream (its own pace, no
# publisher in the loop), p50/p99 latency and the cost model over the
# throughput phase: CPU µs per event of the subscriber, daprd and Redis,
# Redis commands, sidecar calls and deliveries per event; then ratios.
#   --events N           events for the throughput phase (default 2000)
#   --latency-events N   events one at a time for latency (default 200)
#   --repeat N           the whole comparison N times, each run's table and
#                        then the medians (the machine is shared and noisy)
#   --details            pids, calls by route and Redis commands by name
#   --baseline BINARY    two more rows (single, bulk): another wasmsub build (e.g. the previous
#                        commit's), for a before/after in the same run
#   --only LIST          some of wasmsub,bulk,native,python (default: all)
#   --bulk-max-messages N  the bulk rows' max_messages (default 32, the Redis component's
#                        concurrency: README, "Sizing bulk deliveries")
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_cargo
cd "$root"
bash scripts/apt-install.sh redis-server python3-venv
daprd="$(bash scripts/get-daprd.sh)"
bash scripts/build-guests.sh "$root/target/guests"
cargo build --release --locked -p wasmsub -p native-subscriber --bins
venv="$WASMSUB_CACHE/bench-venv"
if [ ! -x "$venv/bin/uvicorn" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q dapr dapr-ext-fastapi fastapi uvicorn
fi
exec python3 bench/e2e/run.py --repo "$root" --daprd "$daprd" \
    --wasmsub "$CARGO_TARGET_DIR/release/wasmsub" --native "$CARGO_TARGET_DIR/release/native-subscriber" \
    --component "$root/target/guests/task_created.wasm" --python "$venv/bin/python" "$@"

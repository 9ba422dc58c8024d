#!/usr/bin/env bash
# A soak run (docs/BENCHMARKS.md; not part of the tests): builds release
# binaries, starts the todo example on the embedded store in a scratch data
# directory, offers a mixed load for MINUTES (default 30) at RATE events/s
# (default 300), printing host memory, publish latency and errors per
# minute, then stops the host with SIGTERM.
#   bash scripts/soak.sh [MINUTES] [RATE]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_cargo
cd "$root"
minutes="${1:-30}"
rate="${2:-300}"
bash scripts/build-guests.sh "$root/target/guests"
cargo build --release --locked -p wasmsub -p wasmsub-bench --bins
data="$(mktemp -d)"
port=3591
"$CARGO_TARGET_DIR/release/wasmsub" run --manifest examples/todo/wasmsub.toml --data-dir "$data" \
    --listen "127.0.0.1:$port" 2>"$data/host.log" &
host=$!
trap 'kill -TERM $host 2>/dev/null; wait $host 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/readyz" && break; sleep 0.1; done
"$CARGO_TARGET_DIR/release/wasmsub-bench" soak --url "http://127.0.0.1:$port" --pid "$host" --minutes "$minutes" --rate "$rate"
echo "host log: $(grep -c 'event processed' "$data/host.log") processed lines, $(grep -c ' ERROR ' "$data/host.log") errors" >&2

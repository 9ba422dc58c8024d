#!/usr/bin/env bash
# The contention benchmark (docs/BENCHMARKS.md): one hot key vs distinct
# keys, embedded and through daprd + Redis. Builds the release host, the
# guests and daprd; pass --baseline BINARY to measure another build in the
# same run. Not part of the tests.
#   bash scripts/bench-contention.sh [--events N] [--baseline PATH]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_cargo
cd "$root"
bash scripts/apt-install.sh redis-server
daprd="$(bash scripts/get-daprd.sh)"
bash scripts/build-guests.sh "$root/target/guests"
cargo build --release --locked -p wasmsub --bin wasmsub
exec python3 bench/e2e/contention.py --repo "$root" --daprd "$daprd" --guests "$root/target/guests" \
    --wasmsub "$CARGO_TARGET_DIR/release/wasmsub" "$@"

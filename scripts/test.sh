#!/usr/bin/env bash
# One command that runs every test: installs what is missing (Redis from
# Debian, the guest toolchain, a daprd built from Dapr's Go module, Kafka's
# jars from Maven Central, moto from PyPI, all cached outside the clone),
# then runs the unit and integration tests, including those against a real
# daprd with Redis, Kafka and SNS/SQS (moto) as its broker.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_cargo
cd "$root"

step() { echo "==> $*" >&2; }
started=$SECONDS

step "Debian packages the tests need (redis-server, redis-tools, curl)"
bash scripts/apt-install.sh redis-server redis-tools curl

step "daprd (cached by its pinned version and source hash)"
DAPRD="$(bash scripts/get-daprd.sh)"
export DAPRD
"$DAPRD" --version >&2 || true

step "Kafka's jars (Maven Central) and moto (PyPI) for the broker tests (cached by version)"
KAFKA_LIB="$(bash scripts/get-kafka.sh)"
MOTO_SERVER="$(bash scripts/get-moto.sh)"
export KAFKA_LIB MOTO_SERVER

step "both guest toolchains build loadable components"
bash scripts/check-guest-toolchains.sh

step "guests' native tests (handlers against wasmsub-guest's test double)"
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/guests-native" cargo test --locked --manifest-path guests/Cargo.toml --workspace --quiet

step "cargo test (target dir: $CARGO_TARGET_DIR)"
cargo test --workspace --locked --no-fail-fast "$@"

# Each fuzz target for a short, fixed time (the corpus is kept in the cache,
# so every run starts where the last one stopped). WASMSUB_FUZZ_SECONDS=0
# skips it.
fuzz_seconds="${WASMSUB_FUZZ_SECONDS:-10}"
if [ "$fuzz_seconds" -gt 0 ]; then
    step "fuzz targets, ${fuzz_seconds}s each"
    bash scripts/fuzz.sh "$fuzz_seconds"
fi
step "all tests passed in $((SECONDS - started)) s"

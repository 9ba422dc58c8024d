#!/usr/bin/env bash
# One command that runs every test: installs what is missing (Redis from
# Debian, the guest toolchain, a daprd built from Dapr's Go module, all
# cached outside the clone), then runs the unit and integration tests,
# including those against a real daprd and Redis.
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

step "both guest toolchains build loadable components"
bash scripts/check-guest-toolchains.sh

step "cargo test (target dir: $CARGO_TARGET_DIR)"
cargo test --workspace --locked --no-fail-fast "$@"
step "all tests passed in $((SECONDS - started)) s"

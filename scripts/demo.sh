#!/usr/bin/env bash
# One command from a fresh clone to the todo demo on the embedded default
# (no Dapr needed): builds the guests and the host, then runs `wasmsub demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_cargo
bash "$root/scripts/build-guests.sh" "$root/target/guests"
cd "$root"
cargo build --locked -p wasmsub --bin wasmsub
exec "$CARGO_TARGET_DIR/debug/wasmsub" demo --manifest examples/todo/wasmsub.toml "$@"

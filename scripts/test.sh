#!/usr/bin/env bash
# One command that runs every test: installs what is missing (Debian
# packages, the guest toolchain), builds the guests (tests/build.rs) and runs
# the unit and integration tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_cargo
cd "$root"

step() { echo "==> $*" >&2; }

step "building and testing (cargo target dir: $CARGO_TARGET_DIR)"
cargo test --workspace --locked --no-fail-fast "$@"

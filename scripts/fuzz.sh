#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS each (default 20), on a
# nightly toolchain with cargo-fuzz (installed into the cache when missing).
# A crash stops the script with the input libFuzzer saved; turn it into a
# test (tests/tests/fuzz_regressions.rs) once fixed.
#   bash scripts/fuzz.sh [SECONDS]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_cargo
seconds="${1:-20}"
tools="$WASMSUB_CACHE/tools"
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
    echo "fuzz: installing cargo-fuzz into $tools" >&2
    CARGO_TARGET_DIR="$WASMSUB_CACHE/cargo-fuzz-build" cargo install cargo-fuzz --locked --root "$tools" >&2
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal >&2
cd "$root/fuzz"
export CARGO_TARGET_DIR="$WASMSUB_CACHE/fuzz-target"
export PATH="$tools/bin:$PATH"
for target in $(cargo +nightly fuzz list); do
    echo "==> fuzz $target for ${seconds}s" >&2
    mkdir -p "$WASMSUB_CACHE/fuzz-corpus/$target"
    cargo +nightly fuzz run "$target" "$WASMSUB_CACHE/fuzz-corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=0 >&2
done
echo "fuzz: every target ran ${seconds}s without a crash" >&2

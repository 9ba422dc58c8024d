#!/usr/bin/env bash
# Builds the guests both ways (rustup's wasm32-wasip2 target, and Debian's
# rustc-web with -Zbuild-std) and checks that each way yields the same set of
# components and that the host loads every one of them as a handler (or
# refuses wrong-world, as it must). Where rustup cannot get the target, only
# the Debian way is checked, and the script says so.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$root"
out="$WASMSUB_CACHE/toolchain-check"
rm -rf "$out"

ways=(debian)
if WASMSUB_GUEST_TOOLCHAIN=auto bash -c 'command -v rustup >/dev/null && { rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2 >/dev/null 2>&1; }'; then
    ways+=(rustup)
else
    echo "check-guest-toolchains: rustup has no wasm32-wasip2 here; checking the Debian way only" >&2
fi

cargo build --locked --quiet -p wasmsub --bin wasmsub
for way in "${ways[@]}"; do
    WASMSUB_GUEST_TOOLCHAIN=$way bash scripts/build-guests.sh "$out/$way"
    manifest="$out/$way/wasmsub.toml"
    printf '[[tenant]]\nname = "check"\n' >"$manifest"
    for wasm in "$out/$way"/*.wasm; do
        name=$(basename "$wasm" .wasm | tr '_' '-')
        [ "$name" = wrong-world ] && continue
        printf '[[tenant.handler]]\nname = "%s"\ncomponent = "%s"\ntopic = "%s"\n' "$name" "$wasm" "$name" >>"$manifest"
    done
    "$CARGO_TARGET_DIR/debug/wasmsub" check --manifest "$manifest" --data-dir "$out/$way/data"
    if "$CARGO_TARGET_DIR/debug/wasmsub" check --manifest <(printf '[[tenant]]\nname = "check"\n[[tenant.handler]]\nname = "w"\ncomponent = "%s"\ntopic = "w"\n' "$out/$way/wrong_world.wasm") 2>/dev/null; then
        echo "check-guest-toolchains: wrong_world.wasm ($way) was accepted" >&2
        exit 1
    fi
done
if [ ${#ways[@]} -eq 2 ]; then
    diff <(cd "$out/debian" && ls *.wasm) <(cd "$out/rustup" && ls *.wasm) >&2 \
        || { echo "check-guest-toolchains: the two ways built different component sets" >&2; exit 1; }
fi
echo "check-guest-toolchains: ${ways[*]}: every component loads" >&2

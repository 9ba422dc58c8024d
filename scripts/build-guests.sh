#!/usr/bin/env bash
# Build every guest in guests/ as a wasm32-wasip2 component and copy the
# .wasm files into OUT_DIR (default: target/guests).
#
# Two ways, tried in this order (docs/ARCHITECTURE.md, "Guest toolchain"):
#  1. the usual one: rustup's wasm32-wasip2 target (installed if possible);
#  2. the fallback for machines where rustup cannot download targets:
#     Debian's rustc-web with its std sources, building std with -Zbuild-std.
# Both compile the same sources with the same profile into components.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-$root/target/guests}"
cache="${WASMSUB_CACHE:-$HOME/.cache/wasmsub}"
log() { echo "build-guests: $*" >&2; }

# Cargo run from a build script leaks its own settings; the guests must not
# inherit the host's target dir, flags or toolchain.
unset CARGO_TARGET_DIR RUSTFLAGS CARGO_ENCODED_RUSTFLAGS RUSTC RUSTC_WRAPPER \
      RUSTDOC CARGO_BUILD_TARGET CARGO_MAKEFLAGS CARGO_PRIMARY_PACKAGE \
      RUSTC_WORKSPACE_WRAPPER CARGO RUSTUP_TOOLCHAIN
while IFS= read -r var; do unset "$var"; done < <(env | sed -n 's/^\(CARGO_\(CFG\|FEATURE\|PKG\|MANIFEST\)[^=]*\)=.*/\1/p')

# Set WASMSUB_GUEST_TOOLCHAIN=rustup or =debian to force one way (CI checks
# that both build); the default tries rustup first.
choice="${WASMSUB_GUEST_TOOLCHAIN:-auto}"

rustup_has_target() {
    command -v rustup >/dev/null || return 1
    rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 && return 0
    log "adding rustup's wasm32-wasip2 target"
    rustup target add wasm32-wasip2 >/dev/null 2>&1
}

ensure_debian_toolchain() {
    local missing=()
    [ -x /usr/bin/rustc ] || missing+=(rustc-web)
    [ -x /usr/bin/cargo ] || missing+=(cargo-web)
    [ -d /usr/lib/rustlib/src/rust/library ] || missing+=(rust-web-src)
    [ -f /usr/lib/wasm32-wasi/libc.a ] || missing+=(wasi-libc)
    command -v ld.lld >/dev/null || missing+=(lld)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        "$root/scripts/apt-install.sh" rustc-web cargo-web rust-web-src wasi-libc lld
    fi
}

# Each build leaves its target directory's path in $target_dir; any failure
# stops the script (no stale component from an earlier build is ever copied).
build_with_rustup() {
    log "using rustup's wasm32-wasip2 target"
    target_dir="$cache/guests-target-rustup-$(rustc --version | tr -cd 'a-z0-9.')"
    CARGO_TARGET_DIR="$target_dir" \
        cargo build --release --locked --target wasm32-wasip2 --manifest-path "$root/guests/Cargo.toml" >&2
}

build_with_debian() {
    ensure_debian_toolchain
    log "using Debian's rustc-web with -Zbuild-std (no rustup wasm32-wasip2 target here)"
    target_dir="$cache/guests-target-debian-$(/usr/bin/rustc --version | tr -cd 'a-z0-9.')"
    PATH="/usr/bin:$PATH" RUSTC_BOOTSTRAP=1 RUSTFLAGS="-L /usr/lib/wasm32-wasi" \
        CARGO_TARGET_DIR="$target_dir" \
        /usr/bin/cargo build --release --locked -Zbuild-std=std,panic_abort --target wasm32-wasip2 \
        --manifest-path "$root/guests/Cargo.toml" >&2
}

case "$choice" in
    rustup) build_with_rustup ;;
    debian) build_with_debian ;;
    auto) if rustup_has_target; then build_with_rustup; else build_with_debian; fi ;;
    *) log "WASMSUB_GUEST_TOOLCHAIN must be rustup, debian or auto, not '$choice'"; exit 2 ;;
esac

# Copy exactly the guests (the cdylib members) of this workspace, so a
# removed guest's old component cannot linger as a fixture; libraries such
# as wasmsub-guest build no component of their own.
rm -rf "$out_dir" && mkdir -p "$out_dir"
members="$(cargo metadata --no-deps --format-version 1 --manifest-path "$root/guests/Cargo.toml" 2>/dev/null \
    | python3 -c 'import json, sys; print(" ".join(p["name"] for p in json.load(sys.stdin)["packages"] if any("cdylib" in t["crate_types"] for t in p["targets"])))')"
[ -n "$members" ] || { log "could not list the guest workspace's members"; exit 1; }
for member in $members; do
    wasm="$target_dir/wasm32-wasip2/release/${member//-/_}.wasm"
    [ -f "$wasm" ] || { log "expected component $wasm was not built"; exit 1; }
    cp "$wasm" "$out_dir/"
done
log "components in $out_dir: $(cd "$out_dir" && ls *.wasm | tr '\n' ' ')"

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

build_with_rustup() {
    command -v rustup >/dev/null || return 1
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
        rustup target add wasm32-wasip2 >/dev/null 2>&1 || return 1
    fi
    log "using rustup's wasm32-wasip2 target"
    CARGO_TARGET_DIR="$cache/guests-target-rustup" \
        cargo build --release --locked --target wasm32-wasip2 --manifest-path "$root/guests/Cargo.toml"
    echo "$cache/guests-target-rustup"
}

ensure_debian_toolchain() {
    local missing=()
    [ -x /usr/bin/rustc ] && /usr/bin/rustc --version | grep -q . || missing+=(rustc-web)
    [ -x /usr/bin/cargo ] || missing+=(cargo-web)
    [ -d /usr/lib/rustlib/src/rust/library ] || missing+=(rust-web-src)
    [ -f /usr/lib/wasm32-wasi/libc.a ] || missing+=(wasi-libc)
    command -v ld.lld >/dev/null || missing+=(lld)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        "$root/scripts/apt-install.sh" rustc-web cargo-web rust-web-src wasi-libc lld
    fi
}

build_with_debian() {
    ensure_debian_toolchain
    log "rustup has no wasm32-wasip2 here; using Debian's rustc-web with -Zbuild-std"
    local target_dir="$cache/guests-target-debian-$(/usr/bin/rustc --version | tr -cd 'a-z0-9.')"
    PATH="/usr/bin:$PATH" RUSTC_BOOTSTRAP=1 RUSTFLAGS="-L /usr/lib/wasm32-wasi" \
        CARGO_TARGET_DIR="$target_dir" \
        /usr/bin/cargo build --release --locked -Zbuild-std=std,panic_abort --target wasm32-wasip2 \
        --manifest-path "$root/guests/Cargo.toml" >&2
    echo "$target_dir"
}

target_dir="$(build_with_rustup || build_with_debian)"
mkdir -p "$out_dir"
for wasm in "$target_dir"/wasm32-wasip2/release/*.wasm; do
    cp -f "$wasm" "$out_dir/"
done
log "components in $out_dir: $(cd "$out_dir" && ls *.wasm | tr '\n' ' ')"

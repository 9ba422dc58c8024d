# Shared by the project's scripts: paths and the build cache.
# Heavy builds live outside the clone, so a fresh clone (CI) reuses them;
# cargo's own fingerprints make a stale entry rebuild, never mislead.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export WASMSUB_CACHE="${WASMSUB_CACHE:-$HOME/.cache/wasmsub}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WASMSUB_CACHE/target}"
mkdir -p "$WASMSUB_CACHE"

require_cargo() {
    if ! command -v cargo >/dev/null; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || { echo "cargo (Rust, via rustup) is needed: https://rustup.rs" >&2; exit 1; }
}

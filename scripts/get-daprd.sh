#!/usr/bin/env bash
# Prints the path of a usable daprd on stdout (logs go to stderr).
#
# Order: $DAPRD (if executable), ~/.dapr/bin/daprd, daprd on PATH, else a
# slim daprd built from tests/daprd (pinned github.com/dapr/dapr, only the
# components the tests use: redis and in-memory pubsub/state, kafka and
# aws.snssqs pubsub) via the Go module proxy, cached
# in ${WASMSUB_CACHE:-~/.cache/wasmsub}/daprd-<version>-<source hash>/daprd.
set -euo pipefail

log() { echo "get-daprd: $*" >&2; }

if [[ -n "${DAPRD:-}" ]]; then
  if [[ -f "$DAPRD" && -x "$DAPRD" ]]; then echo "$DAPRD"; exit 0; fi
  log "ignoring DAPRD=$DAPRD: not an executable file"
fi
if [[ -x "$HOME/.dapr/bin/daprd" ]]; then echo "$HOME/.dapr/bin/daprd"; exit 0; fi
if found=$(command -v daprd 2>/dev/null); then echo "$found"; exit 0; fi

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../tests/daprd" && pwd)"
version=$(awk '$1 == "github.com/dapr/dapr" && $2 ~ /^v/ { print $2; exit }' "$src/go.mod")
[[ -n "$version" ]] || { log "no github.com/dapr/dapr requirement in $src/go.mod"; exit 1; }
hash=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-12)
cache="${WASMSUB_CACHE:-$HOME/.cache/wasmsub}"
out="$cache/daprd-$version-$hash/daprd"

if [[ -x "$out" ]]; then echo "$out"; exit 0; fi

command -v go >/dev/null || { log "no daprd found and no 'go' to build one"; exit 1; }
mkdir -p "$cache"
# One build at a time per cache; whoever waited re-checks for the result.
exec 9>"$cache/.daprd-build.lock"
flock 9
if [[ -x "$out" ]]; then echo "$out"; exit 0; fi

work=$(mktemp -d "$cache/.daprd-build.XXXXXX")
cleanup() { chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

log "building daprd $version from $src (first time takes a few minutes)"
cd "$src"
export GOWORK=off
go mod download github.com/dapr/dapr
dapr_dir=$(go list -m -f '{{.Dir}}' github.com/dapr/dapr)
# cmd/daprd/app imports cmd/daprd/components, whose only untagged file panics
# ("you must use -tags stablecomponents"). Build against a copy of the dapr
# module with that file blanked so main.go's own registrations are the only ones.
cp -R "$dapr_dir" "$work/dapr"
chmod -R u+w "$work/dapr"
printf 'package components\n' >"$work/dapr/cmd/daprd/components/zz_notag.go"
cp go.mod "$work/go.mod"
cp go.sum "$work/go.sum"
printf '\nreplace github.com/dapr/dapr => %s\n' "$work/dapr" >>"$work/go.mod"

go build -modfile "$work/go.mod" -trimpath \
  -ldflags "-s -w -X github.com/dapr/dapr/pkg/buildinfo.version=${version#v}" \
  -o "$work/daprd" .

mkdir -p "$(dirname "$out")"
mv -f "$work/daprd" "$out" # same filesystem: an atomic rename
log "built $out"
echo "$out"

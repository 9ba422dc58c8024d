#!/usr/bin/env bash
# Prints the path of a `moto_server` executable on stdout (logs go to
# stderr). moto serves the AWS APIs (SNS, SQS, STS, ...) on a local port;
# Dapr's pubsub.aws.snssqs component is pointed at it with `endpoint`, so
# the SNS/SQS tests run against real AWS API calls without AWS.
#
# Installed from PyPI into a Python venv of its own, pinned, cached in
# ${WASMSUB_CACHE:-~/.cache/wasmsub}/moto-<version>/ (keyed by the version);
# $MOTO_SERVER wins when it is an executable file.
set -euo pipefail

MOTO_VERSION=5.2.5

log() { echo "get-moto: $*" >&2; }

if [[ -n "${MOTO_SERVER:-}" ]]; then
  if [[ -f "$MOTO_SERVER" && -x "$MOTO_SERVER" ]]; then echo "$MOTO_SERVER"; exit 0; fi
  log "ignoring MOTO_SERVER=$MOTO_SERVER: not an executable file"
fi

cache="${WASMSUB_CACHE:-$HOME/.cache/wasmsub}"
venv="$cache/moto-$MOTO_VERSION"
# The mark is written last: a venv without it is an interrupted install (a
# venv cannot be moved, so it is built in place and removed on failure).
if [[ -f "$venv/.complete" ]]; then echo "$venv/bin/moto_server"; exit 0; fi

command -v python3 >/dev/null || { log "no python3 to install moto into"; exit 1; }
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" python3-venv
fi
mkdir -p "$cache"
exec 9>"$cache/.moto-install.lock"
flock 9
if [[ -f "$venv/.complete" ]]; then echo "$venv/bin/moto_server"; exit 0; fi

rm -rf "$venv"
trap '[[ -f "$venv/.complete" ]] || rm -rf "$venv"' EXIT
log "installing moto[server]==$MOTO_VERSION into $venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
[[ -x "$venv/bin/moto_server" ]] || { log "no moto_server in $venv/bin after the install"; exit 1; }
touch "$venv/.complete"
log "installed $venv/bin/moto_server"
echo "$venv/bin/moto_server"

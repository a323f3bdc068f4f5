#!/usr/bin/env bash
# Install the exact files a no-deps lock names (locks/<name>.lock, made by scripts/lock.sh) into
# a folder of their own, with --no-deps and pip's hash checking: nothing floats, nothing else
# comes in. The files are kept in .whl/dist/, downloaded the first time (offline: put them there
# by hand); the folder is reinstalled only when its lock changes.
# Usage: bash scripts/install_locked.sh <name> [target folder, default .whl/<name>]
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1
LOCK=locks/$NAME.lock
TARGET=${2:-.whl/$NAME}
DIST=.whl/dist
PY=${PYTHON:-python3}
want=$(sha256sum "$LOCK" | cut -c1-16)
STAMP=$TARGET/.lock-sha256
[ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] && exit 0
PIP=("$PY" -m pip --disable-pip-version-check -q)
install() {
  rm -rf "$TARGET"
  # fire ships only an sdist: built here, offline, by the venv's setuptools.
  "${PIP[@]}" install --no-deps --require-hashes --no-index --find-links "$DIST" \
    --no-build-isolation --target "$TARGET" -r "$LOCK"
}
mkdir -p "$DIST"
if ! install 2>/dev/null; then
  "${PIP[@]}" download --no-deps --require-hashes -d "$DIST" -r "$LOCK" \
    || { echo "install_locked: the files $LOCK names are missing from $DIST and PyPI is" \
              "unreachable: copy them there" >&2; exit 1; }
  install
fi
echo "$want" > "$STAMP"
echo "$LOCK installed in $TARGET" >&2

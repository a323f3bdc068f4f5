#!/usr/bin/env bash
# Install peft 0.15.2 (OFT before OFTv2) into its own folder for bench kind=finetune's
# peft015_oft rows: it cannot share an interpreter with the current peft, so the benchmark puts
# this folder first on PYTHONPATH of that row's process only. No dependencies (the current
# environment's torch and transformers serve it). Uses the wheel in .whl/, downloaded from PyPI
# the first time (offline: put the wheel there by hand). scripts/setup.sh calls this.
# Usage: bash scripts/install_peft015.sh [target folder, default .whl/peft015]
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-.whl/peft015}
WHEEL=.whl/peft-0.15.2-py3-none-any.whl
PY=${PYTHON:-python3}
[ -f "$TARGET/peft/__init__.py" ] && [ -f "$TARGET/.from-0.15.2" ] && exit 0
[ -f "$WHEEL" ] || "$PY" -m pip download --disable-pip-version-check -q --no-deps peft==0.15.2 -d .whl \
  || { echo "install_peft015: $WHEEL is missing and PyPI is unreachable: copy the wheel there" >&2; exit 1; }
"$PY" -m pip install --disable-pip-version-check -q --no-deps --no-index --upgrade --target "$TARGET" "$WHEEL"
touch "$TARGET/.from-0.15.2"
echo "peft 0.15.2 installed in $TARGET" >&2

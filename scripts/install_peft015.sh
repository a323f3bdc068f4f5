#!/usr/bin/env bash
# Install peft 0.15.2 (OFT before OFTv2) into its own folder for bench kind=finetune's
# peft015_oft rows: it cannot share an interpreter with the current peft, so the benchmark puts
# this folder first on PYTHONPATH of that row's process only. No dependencies (the current
# environment's torch and transformers serve it). Offline: uses the wheel in .whl/.
# Usage: bash scripts/install_peft015.sh [target folder, default .whl/peft015]
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-.whl/peft015}
WHEEL=.whl/peft-0.15.2-py3-none-any.whl
PY=${PYTHON:-python3}
[ -f "$WHEEL" ] || { echo "install_peft015: $WHEEL is missing: pip download --no-deps peft==0.15.2 -d .whl" >&2; exit 1; }
"$PY" -m pip install --disable-pip-version-check -q --no-deps --no-index --upgrade --target "$TARGET" "$WHEEL"
echo "peft 0.15.2 installed in $TARGET" >&2

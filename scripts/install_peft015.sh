#!/usr/bin/env bash
# Install peft 0.15.2 (OFT before OFTv2) into its own folder for bench kind=finetune's
# peft015_oft rows: it cannot share an interpreter with the current peft, so the benchmark puts
# this folder first on PYTHONPATH of that row's process only. No dependencies (the current
# environment's torch and transformers serve it); pinned with its hash in locks/peft015.lock.
# scripts/setup.sh calls this.
# Usage: bash scripts/install_peft015.sh [target folder, default .whl/peft015]
set -euo pipefail
exec bash "$(dirname "$0")/install_locked.sh" peft015 "$@"

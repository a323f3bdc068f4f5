#!/usr/bin/env bash
# Install NVIDIA kvpress 0.5.5 into its own folder for the Keyformer peer comparison
# (python -m gemvlab.kv.evict.peer_kvpress). kvpress pins transformers<5.3, so it cannot share the
# main environment: the peer process alone puts this folder first on its PYTHONPATH, where it
# shadows the venv's transformers. Everything goes in with --no-deps, exactly as
# locks/kvpress.lock pins it; the folder holds only what the venv does not satisfy: kvpress,
# transformers 5.2.0 with the huggingface-hub (<2) and tokenizers (<=0.23.0) it pins, and the
# small packages kvpress imports at load time that the venv lacks (cachetools<6, fire<0.7 and
# its termcolor), and kernels 0.10 (transformers 5.2 builds its hub-kernel table at import with
# the kernels API of <0.11, which a newer kernels in the venv rejects: "Either a revision or a
# version must be specified"). torch, numpy, safetensors, accelerate, datasets and the rest come
# from the venv. pandas<3 and peft>=0.20 (kvpress pins) are not imported by the presses used
# here. scripts/setup.sh calls this.
# Usage: bash scripts/install_kvpress.sh [target folder, default .whl/kvpress]
set -euo pipefail
exec bash "$(dirname "$0")/install_locked.sh" kvpress "$@"

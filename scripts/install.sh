#!/usr/bin/env bash
# Create .venv (or $VENV) if needed and install embeddingcache into it, editable, with the
# extras and packages given as arguments: scripts/install.sh '.[dev]'
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# torch first and pinned: any other torch requirement may pull a different (CUDA) build.
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet -e "${@:-.}"

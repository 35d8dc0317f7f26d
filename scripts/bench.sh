#!/usr/bin/env bash
# Install the benchmark extras into .venv and run every benchmark; arguments pass through to
# `python -m benchmarks` (--quick, --only NAME..., --no-write). Writes docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh '.[bench]'
exec .venv/bin/python -m benchmarks "$@"

#!/usr/bin/env bash
# Install embeddingcache with its development extras and run the whole test suite.
# Arguments go to pytest. Postgres tests run when EMBEDDING_CACHE_TEST_DB_URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh '.[dev]'
"${VENV:-.venv}/bin/python" -m pytest "$@"

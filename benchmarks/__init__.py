"""Benchmarks of embeddingcache against what a user would otherwise do: run
``python -m benchmarks`` (``bash scripts/bench.sh``); see docs/benchmarks.md."""

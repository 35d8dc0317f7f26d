"""Benchmark 15: warm hits through ``serve``'s ``/v1/embeddings`` (issue 31), each figure
against its own ceiling, all on the same running server and in the same run:

- the official ``openai`` client against the same client asking a canned server
  (`benchmarks.canned`) for the very same answers: what the client itself can take;
- the server's own cost: the client's exact requests sent with raw httpx and the answers
  left undecoded, against ``/embed`` (msgpack) asked for the same texts the same way.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgpack
import numpy as np

from .common import MODEL, OPENAI_INPUTS, Result, median, serving, serving_hits, timings

N = 20_000


def openai_api(work: Path, quick: bool) -> list[Result]:
    with serving_hits(work / "openai-server", N, seed=4) as (url, texts, vectors):
        return openai_hits(url, work, texts, vectors, 3 if quick else 7)


def openai_hits(
    url: str, work: Path, texts: list[str], vectors: np.ndarray, repeat: int
) -> list[Result]:
    import openai

    n = len(texts)
    chunks = [texts[i : i + OPENAI_INPUTS] for i in range(0, n, OPENAI_INPUTS)]
    answers: dict[bytes, bytes] = {}
    requests: list[bytes] = []

    def record(response: httpx.Response) -> None:
        body = response.request.content
        requests.append(body)
        answers[hashlib.sha256(body).digest()] = response.read()

    capture = httpx.Client(event_hooks={"response": [record]}, timeout=60)
    with openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, http_client=capture) as c:
        got = [item.embedding for chunk in chunks for item in _create(c, chunk).data]
    assert np.array_equal(np.asarray(got, dtype=np.float32), vectors)
    canned_file = work / "canned-answers.msgpack"
    canned_file.write_bytes(msgpack.packb(answers))

    bodies = [
        msgpack.packb({"texts": chunk, "model": MODEL, "lookup_only": True}) for chunk in chunks
    ]
    with (
        serving(str(canned_file), module="benchmarks.canned") as canned_url,
        httpx.Client(base_url=url, timeout=60) as raw,
    ):
        # Each pair measured in turns, so that a busy moment of the machine falls on both.
        official, ceiling = interleaved(
            [_official(url, chunks), _official(canned_url, chunks)], repeat
        )
        v1, ours = interleaved(
            [
                _posting(raw, "/v1/embeddings", requests, "application/json"),
                _posting(raw, "/embed", bodies, "application/msgpack"),
            ],
            repeat,
        )
    floats = median(timings(_official(url, chunks, encoding_format="float"), max(1, repeat // 3)))
    return [
        Result(
            "15. OpenAI API warm hits",
            f"{n:,} texts through serve's /v1/embeddings, official openai client (base64): "
            "vectors/s",
            n / official,
            n / ceiling,
            "the same client, the same answers from a canned server",
            ceiling / official,
            ">= 0.9x",
            ceiling / official >= 0.9,
            unit="vectors/s",
            notes=[
                f"against /embed (msgpack, raw httpx): {ours / official:.3f}x; "
                f"JSON floats (encoding_format='float'): {n / floats:,.0f} vectors/s"
            ],
        ),
        Result(
            "15. OpenAI API server side",
            f"{n:,} texts through /v1/embeddings, the client's requests sent with raw httpx, "
            "answers undecoded: vectors/s",
            n / v1,
            n / ours,
            "the same texts through /embed (msgpack), answers undecoded",
            ours / v1,
            ">= 0.6x",
            ours / v1 >= 0.6,
            unit="vectors/s",
        ),
    ]


def _create(client: object, chunk: list[str], **encoding: str) -> object:
    return client.embeddings.create(model=MODEL, input=chunk, **encoding)  # type: ignore[attr-defined]


def _official(url: str, chunks: list[list[str]], **encoding: str) -> Callable[[], None]:
    """Every chunk through a new official client, vectors decoded into lists of floats."""
    import openai

    def run() -> None:
        with openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
            for chunk in chunks:
                answer = _create(client, chunk, **encoding)
                [item.embedding for item in answer.data]  # type: ignore[attr-defined]

    return run


def interleaved(runs: list[Callable[[], None]], repeat: int) -> list[float]:
    """The median seconds of each run, the runs taking turns (after one warm-up each)."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for run, measured in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            measured.append(time.perf_counter() - started)
    return [median(measured) for measured in times]


def _posting(client: httpx.Client, path: str, bodies: list[bytes], kind: str) -> Callable[[], None]:
    headers = {"content-type": kind}

    def run() -> None:
        for body in bodies:
            answer = client.post(path, content=body, headers=headers)
            assert answer.status_code == 200, answer.text[:200]

    return run

"""One batching planner: split items into consecutive batches bounded by a count and a budget.

Local compute slices, the backend's request chunks and (later) API requests are all planned
here, each with its own costs and bounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["plan", "plan_count", "token_bound"]


def plan(
    costs: Iterable[int], *, most: int, budget: int | None = None
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of consecutive items, in order, each holding at most ``most``
    items whose costs sum to at most ``budget`` (``None``: no budget). An item that costs
    more than the budget on its own gets a batch of its own: it is never dropped.
    """
    most = max(1, most)
    start, spent, n = 0, 0, 0
    for n, cost in enumerate(costs, 1):
        i = n - 1
        if i > start and (i - start >= most or (budget is not None and spent + cost > budget)):
            yield start, i
            start, spent = i, 0
        spent += cost
    if n > start:
        yield start, n


def plan_count(n: int, *, most: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of at most ``most`` of ``n`` items that cost alike."""
    most = max(1, most)
    for start in range(0, n, most):
        yield start, min(n, start + most)


def token_bound(text: str) -> int:
    """At least as many as the tokens of ``text`` for any byte-level BPE tokenizer
    (tiktoken's, OpenAI's): its UTF-8 length, since every such token is one byte or more.
    It bounds a request's tokens without a tokenizer, so none is loaded to plan batches."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))

"""One progress bar for a whole job: a call with ``show_progress=True``, an `iter_embeddings`
loop, or the command line's file. It counts input texts, shows texts per second, the hits and
computed so far in its postfix, and an ETA when the total is known; on stderr, through tqdm.
A backup or a restore counts bytes instead (``unit="B"``).

The model's own per-batch bar is never shown on top of it (engines get ``show_progress`` to
mean "the caller shows progress": the sentence-transformers engine passes
``show_progress_bar=False`` to ``encode`` and shows its loading bars only then).
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import Slice

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over ``total`` texts (``None``: not known, no ETA); ``enabled=False`` draws
    nothing and costs next to nothing, so callers hold one either way. ``unit="B"`` counts
    bytes, shown in kB, MB, GB."""

    def __init__(self, total: int | None, *, enabled: bool = True, unit: str = "text") -> None:
        self.enabled = enabled
        self.hits = 0
        self.computed = 0
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                unit=unit,
                unit_scale=unit == "B",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def add(self, texts: int, *, hits: int = 0, computed: int = 0) -> None:
        """Move the bar by ``texts`` input texts, of which ``hits`` came from a cache (this
        one or the backend) and ``computed`` were computed; the rest repeat other texts."""
        if self._bar is None:
            return
        self.hits += hits
        self.computed += computed
        if hits or computed:
            self._bar.set_postfix({"hits": self.hits, "computed": self.computed}, refresh=False)
        self._bar.update(texts)

    def slice(self, part: Slice) -> None:
        """The pipeline's callback: a slice of distinct texts is done."""
        n = len(part.positions)
        if part.source == "computed":
            self.add(n, computed=n)
        else:
            self.add(n, hits=n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

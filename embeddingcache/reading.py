"""Read-time options: what is derived from the stored raw float32 vectors on the way out.

``dimensions`` (the first ones, for Matryoshka models), ``normalize_embeddings`` (unit
length, after ``dimensions``), ``dtype`` and the output type. One shard serves all of them;
the methods of `EmbeddingCache` and the server apply them here, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._util import positive_int
from .errors import InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "OUTPUTS", "Dtype", "Output", "ReadOptions", "apply", "read_options"]

Dtype = Literal["float32", "float64"]
Output = Literal["numpy", "list", "torch"]
DTYPES: dict[str, type[np.floating[Any]]] = {"float32": np.float32, "float64": np.float64}
OUTPUTS: tuple[str, ...] = ("numpy", "list", "torch")


@dataclass(frozen=True)
class ReadOptions:
    """Checked read-time options (see `read_options`)."""

    dimensions: int | None = None
    normalize_embeddings: bool = False
    dtype: type[np.floating[Any]] = np.float32
    output: str = "numpy"


def read_options(
    *,
    dimensions: int | None = None,
    normalize_embeddings: bool = False,
    dtype: str = "float32",
    output: str = "numpy",
) -> ReadOptions:
    """The options, checked before any work is done.

    Raises:
        InvalidInputError: an unknown output or dtype, or ``dimensions`` not a positive int.
    """
    if dimensions is None and not normalize_embeddings and dtype == "float32":
        # Every call checks its options: the usual ones cost a lookup, not an object.
        found = _PLAIN.get(output) if isinstance(output, str) else None
        if found is not None:
            return found
    if output not in OUTPUTS:
        raise InvalidInputError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    if dimensions is not None:
        positive_int(dimensions, "dimensions")
    try:
        out_dtype = DTYPES[dtype]
    except (KeyError, TypeError):
        raise InvalidInputError(
            f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}"
        ) from None
    return ReadOptions(dimensions, bool(normalize_embeddings), out_dtype, output)


_PLAIN = {output: ReadOptions(output=output) for output in OUTPUTS}


def apply(
    vectors: np.ndarray, options: ReadOptions, *, model: str, single: bool = False
) -> np.ndarray | list[float] | list[list[float]] | torch.Tensor:
    """``(n, dim)`` raw vectors of ``model`` as the options ask: row 0 alone for ``single``.
    The array may be modified in place: pass one the caller owns.

    Raises:
        InvalidInputError: ``dimensions`` exceeds the model's; torch asked for, not installed.
    """
    result = vectors
    if options.dimensions is not None and result.size:
        if options.dimensions > result.shape[1]:
            raise InvalidInputError(
                f"dimensions={options.dimensions}, but model {model!r} gives "
                f"{result.shape[1]}-d vectors"
            )
        result = np.ascontiguousarray(result[:, : options.dimensions])
    if options.normalize_embeddings:
        norms = np.linalg.norm(result, axis=1, keepdims=True)
        np.divide(result, norms, out=result, where=norms > 0)
    if options.dtype is not np.float32:
        result = result.astype(options.dtype)
    if single:
        result = result[0]
    if options.output == "list":
        listed: list[float] | list[list[float]] = result.tolist()
        return listed
    if options.output == "torch":
        return _to_torch(result)
    return result


def _to_torch(vectors: np.ndarray) -> torch.Tensor:
    try:
        import torch
    except ImportError:
        raise InvalidInputError(
            "output='torch' needs torch: pip install torch (or embeddingcache[local])"
        ) from None
    return torch.from_numpy(vectors)

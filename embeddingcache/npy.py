"""The CLI's ``.npy`` output, written through the file as the rows come (issue 32).

A memory-mapped output (``numpy.lib.format.open_memmap``) keeps every page written resident
in the process until it is unmapped: its peak RSS grew with the file (632 MB at 20,000 lines,
909 MB at 200,000). Rows written with ``write`` go to the page cache, which the kernel
writes back and reclaims, so the process holds one chunk at a time whatever the line count.
The file is the one ``numpy.save`` writes for the same matrix, byte for byte: the same
header (format 1.0, for the shape known before the first row), then the rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["NpyWriter"]

DTYPE = np.dtype("<f4")


class NpyWriter:
    """An ``(rows, dimension)`` float32 ``.npy`` file at ``path``, written a chunk of rows
    at a time; the dimension is the first chunk's. A file closed before every row came
    (an interrupted job) has zeros for the rest, as a memory-mapped one had."""

    def __init__(self, path: str | Path, rows: int) -> None:
        self.path = Path(path)
        self.rows = rows
        self.written = 0
        self.dimension: int | None = None
        self._file: BinaryIO | None = None  # opened with the first rows, as a map was
        self._data_at = 0

    def write(self, vectors: np.ndarray) -> None:
        """Append rows, in order.

        Raises:
            ValueError: rows of another dimension than the first, or more rows than the file
                holds.
        """
        block = np.ascontiguousarray(vectors, dtype=DTYPE)
        if self._file is None:
            self.dimension = block.shape[1]
            self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
            header = {"descr": DTYPE.str, "fortran_order": False, "shape": self.shape}
            np.lib.format.write_array_header_1_0(self._file, header)
            self._data_at = self._file.tell()
        if block.ndim != 2 or block.shape[1] != self.dimension:
            raise ValueError(f"rows of shape {block.shape}, the file's are {self.dimension}-d")
        if self.written + len(block) > self.rows:
            raise ValueError(f"more than the {self.rows} rows of {self.path}")
        self._file.write(block.data)
        self.written += len(block)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.dimension or 0

    def close(self) -> None:
        """Close the file, extended with zero rows to its full shape if rows are missing."""
        if self._file is None or self._file.closed:
            return
        if self.dimension is not None and self.written < self.rows:
            self._file.truncate(self._data_at + self.rows * self.dimension * DTYPE.itemsize)
        self._file.close()

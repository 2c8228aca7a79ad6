"""How ``combine`` stores its result: extract's sparse encoding, with every decoded element exactly the
float32 (float64) value computed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from ._io import ShardedWriter
    from .card import TensorEntry


def values_code_for(source: str, work: str, chunks: list[np.ndarray]) -> str:
    """The tensor's own dtype (a code), unless so many deltas need a fix-up (index + value, 12 bytes each) that
    storing every value in the work dtype is smaller. ``chunks``: the result's values in the work dtype."""
    from ._npdtype import narrow, to_work

    if source == work:
        return source
    changed = inexact = 0
    for c in chunks:  # zeros are exact in every dtype: no need to pick the nonzero elements out
        changed += int(np.count_nonzero(c))
        with np.errstate(over="ignore"):
            inexact += int(np.count_nonzero(to_work(narrow(c, source), source).astype(c.dtype) != c))
    return values_code_from_counts(source, work, changed, inexact)


def values_code_from_counts(source: str, work: str, changed: int, inexact: int) -> str:
    """:func:`values_code_for` from the counts: ``changed`` stored elements, ``inexact`` of them not exactly a
    value of the ``source`` dtype (each a fix-up there)."""
    from ._io import ITEMSIZE

    if source == work:
        return source
    src_bytes = changed * ITEMSIZE[source] + inexact * (8 + ITEMSIZE[work])
    return source if src_bytes < changed * ITEMSIZE[work] else work


def _values_dtype(source_dtype: str, chunks: list[torch.Tensor]) -> torch.dtype:
    """:func:`values_code_for` of torch chunks, as a torch dtype."""
    from ._io import ST_TO_TORCH, TORCH_TO_ST

    work = TORCH_TO_ST[chunks[0].dtype] if chunks else source_dtype
    return ST_TO_TORCH[values_code_for(source_dtype, work, [c.numpy() for c in chunks])]


def write_tensor(entry: TensorEntry, chunks: list[torch.Tensor], writer: ShardedWriter) -> TensorEntry | None:
    """Append the result ``chunks`` (flat row blocks, consumed) of tensor ``entry`` as ``::mask``/``::values``
    (+ exact fix-ups); None when it is all zero."""
    from .formats import TensorEncoder, check_finite, encode_delta

    for c in chunks:
        check_finite(entry.name, c, "the combination overflows")
    values_dtype = _values_dtype(entry.source_dtype, chunks)
    out = TensorEncoder(writer, entry.name, tuple(entry.shape), entry.source_dtype, values_dtype, sparse=True)
    chunks.reverse()
    while chunks:  # each chunk is released once encoded: the stored form replaces it in memory
        out.add(encode_delta(chunks.pop(), values_dtype, sparse=True))
    return out.finish()


def open_writer(folder: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> ShardedWriter:
    """A ShardedWriter for tensors ``shapes``, with room reserved for the largest header a shard can need."""
    from ._io import ShardedWriter
    from .formats import VECTOR_STEM, header_bound

    return ShardedWriter(folder, VECTOR_STEM, shard_bytes, {"format": "rvhub-sparse"},
                         header_reserve=header_bound(shapes, sparse=True))

"""How ``combine`` stores its result: extract's sparse encoding, with every decoded element exactly the
float32 (float64) value computed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ._io import ShardedWriter
    from .card import TensorEntry


def _values_dtype(source_dtype: str, chunks: list[torch.Tensor]) -> torch.dtype:
    """The tensor's own dtype, unless so many deltas need a fix-up (index + value, 12 bytes each) that storing
    every value in the work dtype is smaller."""
    import torch

    from ._io import ST_TO_TORCH

    src = ST_TO_TORCH[source_dtype]
    work = chunks[0].dtype if chunks else src
    if src == work:
        return src
    changed = inexact = 0
    for c in chunks:  # zeros are exact in every dtype: no need to pick the nonzero elements out
        changed += int(torch.count_nonzero(c))
        inexact += int(torch.count_nonzero(c.to(src).to(work) != c))
    src_bytes = changed * src.itemsize + inexact * (8 + work.itemsize)
    return src if src_bytes < changed * work.itemsize else work


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

"""How ``combine`` stores its result: extract's sparse encoding, with every decoded element exactly the
float32 (float64) value computed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ._io import ShardedWriter
    from .card import TensorEntry
    from .formats import EncodedChunk


def _encode_delta(
    d_work: torch.Tensor, changed_mask: np.ndarray, values_dtype: torch.dtype, sparse: bool
) -> EncodedChunk:
    """Encode the float32 (float64) deltas ``d_work`` so that every decoded element equals them exactly: in
    ``values_dtype`` where that is exact, the rest as exact fix-ups (fix_hi = the delta; no fix_lo)."""
    # TODO(merge): replace by formats.encode_delta
    import numpy as np
    import torch

    from .formats import EncodedChunk

    idx = torch.from_numpy(np.flatnonzero(changed_mask))
    d = d_work.index_select(0, idx)
    stored = d.to(values_dtype)
    bad = (stored.to(d.dtype) != d).nonzero().reshape(-1)
    fix_pos = idx[bad]
    fix_hi = d[bad]
    if sparse:
        values = stored
    else:
        values = torch.zeros(d_work.numel(), dtype=values_dtype)
        values.index_put_((idx,), stored)
    return EncodedChunk(changed_mask, int(idx.numel()), values, fix_pos, fix_hi, torch.empty(0, dtype=d.dtype))


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
    (+ fix-ups); None when it is all zero."""
    import torch

    from ._io import TORCH_TO_ST, TensorSpec
    from .card import TensorEntry
    from .formats import FIX_HI, FIX_INDEX, MASK, VALUES, check_finite, pack_bits

    name = entry.name
    for c in chunks:
        check_finite(name, c, "the combination overflows")
    values_dtype = _values_dtype(entry.source_dtype, chunks)
    masks, values, fix_pos, fix_hi = [], [], [], []
    start = changed = 0
    chunks.reverse()
    while chunks:  # each chunk is released once encoded: the stored form replaces it in memory
        c = chunks.pop()
        enc = _encode_delta(c, (c != 0).numpy(), values_dtype, sparse=True)
        changed += enc.n_changed
        masks.append(pack_bits(enc.changed))
        values.append(enc.values)
        if enc.fix_pos.numel():
            fix_pos.append(enc.fix_pos + start)
            fix_hi.append(enc.fix_hi)
        start += c.numel()
    if changed == 0:
        return None
    import numpy as np

    mask = np.concatenate(masks)
    writer.add(TensorSpec(name + MASK, "U8", (mask.size,)), [mask])
    vals = torch.cat(values)
    writer.add(TensorSpec(name + VALUES, TORCH_TO_ST[vals.dtype], (vals.numel(),)), [vals])
    n_fix = sum(t.numel() for t in fix_pos)
    if n_fix:
        hi = torch.cat(fix_hi)
        writer.add(TensorSpec(name + FIX_INDEX, "I64", (n_fix,)), [torch.cat(fix_pos)])
        writer.add(TensorSpec(name + FIX_HI, TORCH_TO_ST[hi.dtype], (n_fix,)), [hi])
    return TensorEntry(name=name, shape=entry.shape, source_dtype=entry.source_dtype, changed=changed, fixups=n_fix)


def open_writer(folder: Path, numel: dict[str, int], total: int, shard_bytes: int) -> ShardedWriter:
    """A ShardedWriter for tensors ``numel`` (name → elements; ``total`` elements read in all), with room
    reserved for the largest header a shard can need, as extract does."""
    from ._io import ShardedWriter
    from .formats import VECTOR_STEM

    offsets = 2 * len(str(21 * max(total, 1)))
    entry = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},') + offsets
    size = 64
    for name, n in numel.items():
        size += 4 * (len(json.dumps(name)) - 2 + entry + len(str(n)) + 11)  # ::mask, ::values, ::fix_index, ::fix_hi
    return ShardedWriter(folder, VECTOR_STEM, shard_bytes, {"format": "rvhub-sparse"},
                         header_reserve=size + (-size % 8))

"""``combine --method sum`` in numpy, in the sparse domain: only the elements some input changes are computed.

Per row block, every input's delta is decoded onto the union of the positions the inputs store, weighted and
summed in the work dtype in input order, then multiplied by α: the same float32 (float64) operations on the
same operands as summing the dense blocks (an element no input stores is ±0 there and is not stored), so the
stored result is the same, bit for bit. It is written in extract's sparse encoding, with the values dtype
chosen by :func:`rvhub._combine_io.values_code_for`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ._combine_io import values_code_for
from .formats import (
    _WORK_NP,
    RawDelta,
    TensorEncoder,
    VectorFolder,
    _add_at,
    _encode_selected,
    check_finite_raw,
    work_code,
)
from .sources import CHUNK_ELEMS, row_blocks

if TYPE_CHECKING:
    from ._io import ShardedWriter
    from .card import TensorEntry


def sum_tensor(
    name: str, folders: Sequence[VectorFolder], w: Sequence[float], alpha: float, writer: ShardedWriter
) -> TensorEntry | None:
    """Write ``α·Σ wᵢ·vᵢ`` of tensor ``name`` (the inputs that store it, with their weights) into ``writer``;
    its card entry, or None when the result is all zero."""
    entry = next(f.entries[name] for f in folders if name in f.entries)
    shape = tuple(entry.shape)
    numel = math.prod(shape)
    terms = [(f, wi) for f, wi in zip(folders, w, strict=True) if name in f.entries]
    work = work_code(*(f.entries[name].source_dtype for f, _ in terms))
    wt = _WORK_NP[work]
    if numel == 0:
        return None  # an empty tensor has no delta to store
    rows = shape[0] if shape else 1
    row_elems = math.prod(shape[1:])
    blocks = row_blocks(shape, CHUNK_ELEMS) if shape else [(0, 1)]
    sizes = [(b - a) * row_elems for a, b in blocks] if shape else [1]
    streams = [f.delta_chunks_np(name, rows, CHUNK_ELEMS, 1.0, work) for f, _ in terms]
    results: list[tuple[int, np.ndarray, np.ndarray]] = []  # (block size, positions, values) per block
    for m in sizes:
        deltas = [next(s) for s in streams]
        pos, rank = _union(m, deltas)
        acc: np.ndarray | None = None
        for d, (_, wi) in zip(deltas, terms, strict=True):
            v = np.zeros(pos.size, dtype=wt)
            _decode_onto(v, rank, d)
            with np.errstate(over="ignore", invalid="ignore"):  # reported by the finite check below
                if acc is None:
                    acc = v
                    if wi != 1.0:
                        acc *= wt(wi)
                    continue
                if wi != 1.0:
                    v *= wt(wi)
                acc += v
        assert acc is not None
        if alpha != 1.0:
            with np.errstate(over="ignore", invalid="ignore"):
                acc = acc * wt(alpha)
        results.append((m, pos, acc))
    for s in streams:  # the decoders' end-of-tensor checks (mask counts)
        for _ in s:
            pass
    for _, _, acc in results:
        check_finite_raw(name, acc, work, "the combination overflows")
    values_code = values_code_for(entry.source_dtype, work, [acc for _, _, acc in results])
    out = TensorEncoder(writer, name, shape, entry.source_dtype, values_code, sparse=True)
    results.reverse()
    while results:  # each block is released once encoded
        m, pos, acc = results.pop()
        nz = np.flatnonzero(acc != 0)
        changed = np.zeros(m, dtype=np.bool_)
        idx = pos.take(nz)
        changed[idx] = True
        out.add(_encode_selected(changed, idx, acc.take(nz), values_code, sparse=True, exact=True))
    return out.finish()


def _union(m: int, deltas: list[RawDelta]) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted positions (in a block of ``m`` elements) that some input's chunk stores, and each block
    position's slot among them (None when they are every position: the slot is the position)."""
    if any(d.index is None and d.values.size for d in deltas):  # a dense input stores every element
        return np.arange(m, dtype=np.int64), None
    hit = np.zeros(m, dtype=np.bool_)
    for d in deltas:
        if d.index is not None:
            hit[d.index] = True
    rank = np.cumsum(hit, dtype=np.int64)
    rank -= 1
    return np.flatnonzero(hit), rank


def _decode_onto(v: np.ndarray, rank: np.ndarray | None, d: RawDelta) -> None:
    """v (zeros over the union) += the chunk's decoded delta, as :meth:`RawDelta.add_to` adds it to a zero
    block; ``rank`` maps block positions to slots of the union (see :func:`_union`)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if d.index is None:
            v[: d.values.size] += d.values  # the union is every position whenever a dense input has values
        elif d.values.size:
            _add_at(v, d.index if rank is None else rank.take(d.index), d.values)
        if d.fix_lo.size:
            _add_at(v, d.fix_pos if rank is None else rank.take(d.fix_pos), d.fix_lo)

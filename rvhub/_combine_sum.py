"""``combine --method sum`` in numpy: one row block at a time, in a reused block-sized work buffer.

Per block, the buffer starts at zero; the first input's decoded delta (times its weight) is put at the
positions it stores, every further one's is added at its positions, in input order; the block is multiplied
by α. Those are the float32 (float64) operations of summing the dense blocks, on the same operands (an element
an input does not store is ±0 in its dense block, and ``x + ±0 = x`` for every x ≠ 0), so every nonzero
element, the only ones stored, is the same, bit for bit. The nonzero elements are then encoded at once in
extract's sparse encoding, in the tensor's own dtype; the rare tensor whose fix-ups make the work dtype the
smaller choice (:func:`rvhub._combine_io.values_code_from_counts`) is computed a second time in it.

Tensors are computed on worker threads (:func:`rvhub._parallel.worker_threads`: every CPU this process may use,
or ``RVHUB_THREADS``; every numpy operation used here, and file reads, release the GIL) and
written in order, by the calling thread. The threads share the inputs' readers, which read with ``pread`` (no
file position to race on). The output does not depend on the block size or the number of threads.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from ._combine_io import values_code_from_counts
from ._parallel import worker_threads
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
from .sources import STREAM_CHUNK_ELEMS, row_blocks

if TYPE_CHECKING:
    from ._io import ShardedWriter
    from .card import TensorEntry

IN_FLIGHT_BYTES = 384 << 20  # a bound on the results held ahead of the one being written (estimated)


def sum_tensor(
    name: str, folders: Sequence[VectorFolder], w: Sequence[float], alpha: float, writer: ShardedWriter
) -> TensorEntry | None:
    """Write ``α·Σ wᵢ·vᵢ`` of tensor ``name`` (the inputs that store it, with their weights) into ``writer``;
    its card entry, or None when the result is all zero."""
    return _tensor(name, folders, w, alpha, writer).finish()


def sum_tensors(
    names: Sequence[str], folders: Sequence[VectorFolder], w: Sequence[float], alphas: Sequence[float],
    writer: ShardedWriter, threads: int | None = None,
) -> Iterator[TensorEntry | None]:
    """:func:`sum_tensor` of each of ``names`` (with its α), in order, computed up to ``threads`` at a time
    while earlier ones are written; yields each card entry (None: all zero) once it is written."""
    threads = worker_threads(threads)
    if threads <= 1:
        for name, alpha in zip(names, alphas, strict=True):
            yield sum_tensor(name, folders, w, alpha, writer)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="rvhub-combine") as pool:
        pending: collections.deque[tuple[Future[TensorEncoder], int]] = collections.deque()
        held = 0  # the estimated bytes of the pending results
        todo = iter(zip(names, alphas, strict=True))
        item = next(todo, None)
        try:
            while True:
                # keep every thread busy, and more while the results held ahead of the next one to write stay
                # under the budget: a large tensor in front (an embedding) need not leave a thread idle
                while item is not None:
                    cost = _result_bytes(folders, item[0])
                    if len(pending) >= threads and held - pending[0][1] + cost > IN_FLIGHT_BYTES:
                        break
                    pending.append((pool.submit(_tensor, item[0], folders, w, item[1], writer), cost))
                    held += cost
                    item = next(todo, None)
                if not pending:
                    return
                future, cost = pending.popleft()
                held -= cost
                yield future.result().finish()  # a sparse encoder touches its writer only here
        finally:
            for future, _ in pending:
                future.cancel()


def _result_bytes(folders: Sequence[VectorFolder], name: str) -> int:
    """A bound on the bytes of a tensor's encoded result: its mask, and float32 values for as many elements as
    the inputs store (fix-ups only where values are 16-bit, which halves them)."""
    holders = [f for f in folders if name in f.entries]
    numel = math.prod(holders[0].entries[name].shape)
    stored = sum(f.entries[name].changed if f.sparse else numel for f in holders)
    return numel // 8 + 4 * min(numel, stored)


def _tensor(
    name: str, folders: Sequence[VectorFolder], w: Sequence[float], alpha: float, writer: ShardedWriter
) -> TensorEncoder:
    """The tensor's encoder, holding every block of the result, ready for ``finish`` (which writes it)."""
    entry = next(f.entries[name] for f in folders if name in f.entries)
    terms = [(f, wi) for f, wi in zip(folders, w, strict=True) if name in f.entries]
    work = work_code(*(f.entries[name].source_dtype for f, _ in terms))
    source = entry.source_dtype
    enc, changed, inexact = _encode_as(name, terms, alpha, work, source, writer)
    if source != work and values_code_from_counts(source, work, changed, inexact) == work:
        enc, _, _ = _encode_as(name, terms, alpha, work, work, writer)
    return enc


def _encode_as(
    name: str, terms: Sequence[tuple[VectorFolder, float]], alpha: float, work: str, values_code: str,
    writer: ShardedWriter,
) -> tuple[TensorEncoder, int, int]:
    """The result's blocks encoded with values of dtype ``values_code``; with the number of stored elements and
    of fix-ups (elements whose value that dtype cannot hold exactly)."""
    entry = terms[0][0].entries[name]
    shape = tuple(entry.shape)
    enc = TensorEncoder(writer, name, shape, entry.source_dtype, values_code, sparse=True)
    numel = math.prod(shape)
    if numel == 0:
        return enc, 0, 0  # an empty tensor has no delta to store
    wt = _WORK_NP[work]
    rows = shape[0] if shape else 1
    row_elems = math.prod(shape[1:])
    blocks = row_blocks(shape, STREAM_CHUNK_ELEMS) if shape else [(0, 1)]
    sizes = [(b - a) * row_elems for a, b in blocks] if shape else [1]
    # each weight and α rounded to the work dtype once (0-d arrays): every product below is one rounding
    weights = [None if wi == 1.0 else np.asarray(wi, dtype=wt) for _, wi in terms]
    scale = None if alpha == 1.0 else np.asarray(alpha, dtype=wt)
    streams = [f.delta_chunks_np(name, rows, STREAM_CHUNK_ELEMS, 1.0, work) for f, _ in terms]
    buf = np.empty(max(sizes), dtype=wt)
    changed = inexact = 0
    for m in sizes:
        acc = buf[:m]
        acc.fill(0)
        with np.errstate(over="ignore", invalid="ignore"):  # reported by the finite check below
            for i, (s, wi) in enumerate(zip(streams, weights, strict=True)):
                _accumulate(acc, next(s), wi, first=i == 0)
            if scale is not None:
                acc *= scale
        keep = acc != 0
        idx = np.flatnonzero(keep)
        values = acc.take(idx)
        with np.errstate(over="ignore", invalid="ignore"):  # its sum of an inf and a -inf is the alarm
            check_finite_raw(name, values, work, "the combination overflows")
        raw = _encode_selected(keep, idx, values, values_code, sparse=True, exact=True, finite=True)
        changed += raw.n_changed
        inexact += int(raw.fix_pos.size)
        enc.add(raw)
    for s in streams:  # the decoders' end-of-tensor checks (mask counts)
        for _ in s:
            pass
    return enc, changed, inexact


def _accumulate(acc: np.ndarray, d: RawDelta, w: np.ndarray | None, first: bool) -> None:
    """acc += w·(the chunk's decoded delta) at the positions it stores (the first input's is put there: acc is
    zero). The decoded delta is ``(0 + values) + fix_lo``, as :meth:`RawDelta.add_to` gives it on a zero block."""
    v = d.values  # the decoder's own fresh array: changed in place
    if d.fix_lo.size:
        slots = d.fix_pos if d.index is None else np.searchsorted(d.index, d.fix_pos)
        _add_at(v, slots, d.fix_lo)
    if w is not None:
        v *= w
    if d.index is None:
        if first:
            acc[: v.size] = v
        else:
            acc[: v.size] += v
    elif first:
        acc[d.index] = v  # sorted, unique, inside the block
    elif v.size:
        _add_at(acc, d.index, v)

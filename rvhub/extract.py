"""``extract``: v = θ_to − θ_from, per tensor, in float32, streamed chunk by chunk into a vector folder."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._io import (
    ShardedWriter,
    atomic_dir,
    check_output,
    check_stop,
    dtype_code,
    parse_size,
)
from ._parallel import ordered_map, worker_threads
from ._progress import progress_bar, tensor_done
from .card import ModelRef, TensorEntry, VectorCard, file_entries
from .compat import fingerprints
from .errors import InvalidOptionError, MissingTensorError, ShapeMismatchError, UnsupportedTensorError
from .formats import VECTOR_STEM, RawChunk, TensorEncoder, encode_chunk, header_bound
from .sources import STREAM_CHUNK_ELEMS, ModelSource, TensorInfo, open_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractResult:
    """What ``extract`` wrote."""

    out: str
    format: str
    exact: bool
    tensors: int
    unchanged_tensors: int
    elements: int
    changed_elements: int
    fixups: int
    vector_bytes: int
    model_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Pair:
    name: str
    src: TensorInfo  # in `from` (may be the tied embedding standing in for lm_head)
    dst: TensorInfo  # in `to`


def pair_tensors(a: ModelSource, b: ModelSource, a_label: str = "from", b_label: str = "to") -> list[_Pair]:
    """Match the tensors of two models by name, resolving tied heads; check names and shapes.

    When both models tie lm_head to the embeddings, lm_head is left out (the embedding delta moves both).
    When only one ties, its effective lm_head is its embedding matrix, so the head gets a delta of its own.
    """
    names_a = _own_names(a)
    names_b = _own_names(b)
    both_tied = a.tied and b.tied
    pair = a.tied_pair or b.tied_pair
    if pair and not both_tied:
        head = pair[0]
        names_a.add(head)
        names_b.add(head)
    only_a = sorted(names_a - names_b)
    only_b = sorted(names_b - names_a)
    if only_a:
        raise MissingTensorError(only_a, f"{a_label} ({a.ref.id})", f"{b_label} ({b.ref.id})")
    if only_b:
        raise MissingTensorError(only_b, f"{b_label} ({b.ref.id})", f"{a_label} ({a.ref.id})")
    pairs = []
    for name in sorted(names_a):
        ia, ib = _resolve(a, name), _resolve(b, name)
        if ia.shape != ib.shape:
            raise ShapeMismatchError(name, ia.shape, ib.shape, f"{a_label} ({a.ref.id})", f"{b_label} ({b.ref.id})")
        pairs.append(_Pair(name, ia, ib))
    return pairs


def _own_names(src: ModelSource) -> set[str]:
    names = set(src.tensors)
    pair = src.tied_pair
    if src.tied and pair:
        names.discard(pair[0])  # a tied checkpoint may still store lm_head: it is an alias, not a tensor
    return names


def _resolve(src: ModelSource, name: str) -> TensorInfo:
    pair = src.tied_pair
    if pair and name == pair[0] and (src.tied or name not in src.tensors):
        return src.tensors[pair[1]]
    return src.tensors[name]


def extract(
    from_model: str,
    to_model: str,
    out: str | Path,
    *,
    format: Literal["sparse", "dense"] = "sparse",
    dtype: str | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    progress: bool = True,
    chunk_elems: int = STREAM_CHUNK_ELEMS,
    threads: int | None = None,
) -> ExtractResult:
    """Compute v = θ_to − θ_from and write it to the vector folder ``out``.

    ``format="sparse"`` (default) stores a bitmask of changed elements and their deltas, exactly;
    ``"dense"`` stores full deltas in float32 (exact) or ``dtype`` (e.g. bfloat16, lossy).
    ``threads`` (default ``$RVHUB_THREADS``, else every CPU) read and encode chunks; the files do not depend on it.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if format not in ("sparse", "dense"):
        raise InvalidOptionError("--format", format, "use sparse or dense")
    if format == "sparse" and dtype is not None:
        raise InvalidOptionError(
            "--dtype", dtype, "sparse vectors store each delta in its tensor's own dtype, exactly; "
            "--dtype is for --format dense"
        )
    dense_code = dtype_code(dtype) if dtype else "F32"
    shard_bytes = parse_size(max_shard_size)
    n_threads = worker_threads(threads)
    inputs = [Path(p) for p in (from_model, to_model) if Path(p).exists()]
    check_output(out, overwrite, inputs)

    src_from = open_model(from_model)
    src_to = open_model(to_model)
    pairs = pair_tensors(src_from, src_to)
    for p in pairs:
        if not (p.src.is_float and p.dst.is_float) and p.src.dtype != p.dst.dtype:
            raise UnsupportedTensorError(p.name, f"{p.src.dtype}/{p.dst.dtype}")
    sparse = format == "sparse"
    entries: list[TensorEntry] = []
    unchanged: list[str] = []
    total_bytes = sum(p.src.nbytes + p.dst.nbytes for p in pairs)
    exact = all(_exact(p, sparse, dense_code) for p in pairs if p.dst.is_float)

    with atomic_dir(out, overwrite) as tmp:
        meta, reserve = {"format": f"rvhub-{format}"}, _header_bound(pairs, sparse)
        with (
            ShardedWriter(tmp, VECTOR_STEM, shard_bytes, meta, header_reserve=reserve) as writer,
            progress_bar(total_bytes, f"extract {format}", progress, len(pairs)) as bar,
        ):
            plans = [_plan_tensor(p, src_from, src_to, sparse, dense_code, chunk_elems) for p in pairs]
            # every tensor's chunks, read and encoded on worker threads, come back here in order
            tasks = (task for plan in plans for task in plan.tasks)
            with contextlib.closing(ordered_map(tasks, n_threads)) as results:
                for plan in plans:
                    entry = plan.write(writer, results)
                    if entry is not None:  # dense vectors keep unchanged tensors (as zeros) too
                        entries.append(entry)
                    if entry is None or entry.changed == 0:
                        unchanged.append(plan.pair.name)
                    tensor_done(bar, plan.pair.src.nbytes + plan.pair.dst.nbytes)
            names = writer.close()
        files = file_entries(tmp, names)
        prints = fingerprints(src_from, [(e.name, e.shape) for e in entries])
        card = VectorCard(
            format=format,
            values_dtype="source" if sparse else dense_code,  # type: ignore[arg-type]
            exact=exact,
            source_from=_pinned(src_from),
            source_to=_pinned(src_to),
            model_type=src_to.model_type or src_from.model_type,
            tie_word_embeddings=src_from.tied and src_to.tied,
            tensors=entries,
            unchanged=unchanged,
            files=files,
            fingerprints=prints,
        )
        card.write(tmp)
    model_bytes = sum(p.dst.nbytes for p in pairs)
    return ExtractResult(
        out=str(out),
        format=format,
        exact=exact,
        tensors=len(entries),
        unchanged_tensors=len(unchanged),
        elements=sum(p.dst.numel for p in pairs),
        changed_elements=sum(e.changed for e in entries),
        fixups=sum(e.fixups for e in entries),
        vector_bytes=sum(f.size for f in files),
        model_bytes=model_bytes,
        seconds=round(time.perf_counter() - t0, 3),
    )


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Chunk arithmetic is memory-bound; a second intra-op thread only competes with the hashing and
    writing threads (measured on 2 cores: 1.8–2.0 s vs 2.4–2.5 s for a 0.5B extract)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _header_bound(pairs: list[_Pair], sparse: bool) -> int:
    """Room for the largest safetensors header a shard can need (see :func:`formats.header_bound`)."""
    return header_bound({p.name: tuple(p.dst.shape) for p in pairs}, sparse)


def _exact(p: _Pair, sparse: bool, dense_code: str) -> bool:
    """Whether the tensor's stored form decodes to the float32 difference exactly (with fix-ups): always for
    sparse; for dense in float32, or in the models' own dtype (elsewhere nearly every element would be one)."""
    return sparse or dense_code == "F32" or p.src.dtype == p.dst.dtype == dense_code


def _pinned(src: ModelSource) -> ModelRef:
    if src.ref.kind == "local":
        return src.ref.model_copy(update={"content_sha256": src.content_sha256()})
    return src.ref


@dataclass(frozen=True)
class _TensorPlan:
    """One tensor's chunk tasks (each reads its block of both models and encodes it), and how to write them."""

    pair: _Pair
    values_code: str
    sparse: bool
    tasks: list[Callable[[], RawChunk | None]]

    def write(self, writer: ShardedWriter, results: Iterator[RawChunk | None]) -> TensorEntry | None:
        """Take this tensor's encoded chunks from ``results`` (in order) and write them; its card entry."""
        p = self.pair
        if not p.dst.is_float:
            next(results)  # integer buffers: checked equal by the task, no delta
            return None
        enc = TensorEncoder(writer, p.name, p.dst.shape, p.dst.dtype, self.values_code, self.sparse, stream=True)
        for _ in self.tasks:
            chunk = next(results)
            assert chunk is not None
            enc.add(chunk)
        return enc.finish()


def _plan_tensor(
    p: _Pair, src_from: ModelSource, src_to: ModelSource, sparse: bool, dense_code: str, chunk_elems: int
) -> _TensorPlan:
    if not p.dst.is_float:  # integer buffers must be equal; they carry no delta
        return _TensorPlan(p, p.dst.dtype, sparse, [functools.partial(_check_equal, p, src_from, src_to)])
    if sparse:  # each tensor's own dtype; float32 when the two models store it differently
        values_code = p.dst.dtype if p.src.dtype == p.dst.dtype else "F32"
    else:
        values_code = dense_code
    exact = _exact(p, sparse, dense_code)
    blocks = src_from.chunk_blocks(p.src.name, chunk_elems)  # the same in both models: the shapes are equal
    tasks: list[Callable[[], RawChunk | None]] = [
        functools.partial(_encode_block, p, src_from, src_to, block, values_code, sparse, exact) for block in blocks
    ]
    return _TensorPlan(p, values_code, sparse, tasks)


def _check_equal(p: _Pair, src_from: ModelSource, src_to: ModelSource) -> None:
    a, b = src_from.read_np(p.src.name), src_to.read_np(p.dst.name)
    if not np.array_equal(a, b):
        raise UnsupportedTensorError(p.name, p.dst.dtype)


def _encode_block(
    p: _Pair, src_from: ModelSource, src_to: ModelSource, block: tuple[int, int] | None, values_code: str,
    sparse: bool, exact: bool,
) -> RawChunk:
    check_stop()
    cf = src_from.read_block_np(p.src.name, block)
    ct = src_to.read_block_np(p.dst.name, block)
    enc = encode_chunk(p.name, cf, p.src.dtype, ct, p.dst.dtype, values_code, sparse, exact)
    return enc.pack() if sparse else enc

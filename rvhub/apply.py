"""``apply``: θ_target + α·v, streamed chunk by chunk, in float32, rounded once to the output dtype."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._io import (
    ShardedWriter,
    TensorSpec,
    atomic_dir,
    check_output,
    check_stop,
    copy_file,
    dtype_code,
    parse_size,
    write_text,
)
from ._npdtype import convert, narrow
from ._parallel import ordered_map, worker_threads
from ._progress import progress_bar, tensor_done
from ._untrusted import decoding, read_json
from .algebra import ScalePatterns
from .compat import check_model, require_compatible
from .errors import (
    InvalidOptionError,
    MissingTensorError,
    ShapeMismatchError,
    TiedEmbeddingError,
    VocabMismatchError,
)
from .formats import (
    AdapterFolder,
    RawDelta,
    VectorFolder,
    check_finite,
    check_finite_raw,
    open_vector,
    work_code,
    work_dtype,
)
from .sources import CHUNK_ELEMS, STREAM_CHUNK_ELEMS, ModelSource, open_model

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_DTYPE_CONFIG_NAME = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` wrote."""

    out: str
    scale: float
    device: str
    tensors_changed: int
    tensors_copied: int
    output_bytes: int
    seconds: float
    skipped_vocab_rows: dict[str, int] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)  # the α each changed tensor got (--scale-pattern)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Job:
    name: str  # target tensor
    spec: TensorSpec  # output tensor
    source: str | None  # vector entry whose delta applies, or None to copy


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``; a clear error when CUDA is asked for but absent."""
    import torch

    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidOptionError("--device", device, "CUDA is not available here; use --device cpu")
        return torch.device(device)
    raise InvalidOptionError("--device", device, "use cpu or cuda (cuda:N)")


def plan_apply(
    vec: VectorFolder | AdapterFolder, tgt: ModelSource, out_code: str | None, allow_vocab_mismatch: bool
) -> tuple[list[_Job], dict[str, int]]:
    """Match vector tensors to target tensors; check shapes, vocab rows and embedding tying."""
    pair = tgt.tied_pair
    head = pair[0] if pair else None
    target_names = set(tgt.tensors)
    if tgt.tied and head:
        target_names.discard(head)  # never write lm_head into a model whose config ties it
    sources: dict[str, str] = {}
    missing = []
    for name in vec.entries:
        if name in target_names:
            sources[name] = name
        elif tgt.tied and name == head:
            raise TiedEmbeddingError(name)
        else:
            missing.append(name)
    if missing:
        raise MissingTensorError(missing, "the vector", f"the target ({tgt.ref.id})")
    if pair and vec.card.tie_word_embeddings and not tgt.tied and pair[1] in vec.entries and head in target_names:
        # the vector's shared embedding matrix moved both input embeddings and output head in its sources
        sources[pair[0]] = pair[1]
    if pair and tgt.tied and not vec.card.tie_word_embeddings and pair[1] in vec.entries:
        logger.warning("target ties lm_head to %s: the vector's embedding delta moves its output head too", pair[1])
    skipped: dict[str, int] = {}
    for name, src in sources.items():
        vshape, tshape = vec.entries[src].shape, tgt.tensors[name].shape
        if vshape == tshape:
            continue
        vocab = name in tgt.vocab_tensors
        if not vocab or vshape[1:] != tshape[1:] or not vshape:
            raise ShapeMismatchError(name, vshape, tshape, "the vector", f"the target ({tgt.ref.id})")
        if not allow_vocab_mismatch:
            raise VocabMismatchError(name, vshape[0], tshape[0])
        skipped[name] = abs(vshape[0] - tshape[0])
    jobs = []
    for name in sorted(target_names):
        info = tgt.tensors[name]
        code = out_code if (out_code and info.is_float) else info.dtype
        jobs.append(_Job(name, TensorSpec(name, code, info.shape), sources.get(name) if info.is_float else None))
    return jobs, skipped


def apply(
    vector: str | Path,
    base: str,
    out: str | Path,
    *,
    scale: float = 1.0,
    dtype: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_vocab_mismatch: bool = False,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    chunk_elems: int | None = None,
    scale_patterns: ScalePatterns | Iterable[str] | None = None,
    threads: int | None = None,
) -> ApplyResult:
    """Write θ_base + scale·v to ``out``: float32 arithmetic, rounded once to the base's dtype (or ``dtype``).

    config.json, generation_config.json and tokenizer files come from ``base``; a tied base stays tied.
    Before anything is written, ``base`` must pass the compatibility check (:func:`rvhub.compat.check`)
    unless ``force``; what cannot be applied at all (missing tensors, shapes) is refused even then.
    ``scale_patterns`` (``REGEX=α``, see :class:`rvhub.algebra.ScalePatterns`) give α per target tensor name;
    ``scale`` is the α of the rest. On the CPU, ``threads`` (default ``$RVHUB_THREADS``, else every CPU) compute
    chunks; the output does not depend on it, nor on ``chunk_elems`` (the row block size; default
    :data:`rvhub.sources.STREAM_CHUNK_ELEMS` on the CPU, 4× that on a GPU).
    """
    t0 = time.perf_counter()
    out = Path(out)
    vector = Path(vector)
    if not math.isfinite(scale):
        raise InvalidOptionError("--scale", scale, "must be a finite number")
    patterns = ScalePatterns.of(scale_patterns, scale)
    out_code = dtype_code(dtype) if dtype else None
    shard_bytes = parse_size(max_shard_size)
    # the CPU path computes in numpy and never imports torch; a GPU one adds in torch on the device
    dev = None if device == "cpu" else resolve_device(device)
    if chunk_elems is None:
        chunk_elems = STREAM_CHUNK_ELEMS if dev is None else CHUNK_ELEMS
    n_threads = worker_threads(threads)
    check_output(out, overwrite, [vector, *([Path(base)] if Path(base).exists() else [])])
    vec = open_vector(vector)
    tgt = open_model(base, hash_content=False)
    jobs, skipped = plan_apply(vec, tgt, out_code, allow_vocab_mismatch)
    if not force:  # plan_apply refused what cannot be applied; this refuses what should not be
        require_compatible(check_model(vec.card, tgt, str(vector), allow_vocab_mismatch=allow_vocab_mismatch))
    for name, rows in skipped.items():
        logger.warning("%s: vocabulary sizes differ; %d row(s) left without a delta", name, rows)
    n_params = sum(tgt.tensors[j.name].numel for j in jobs)
    total = sum(tgt.tensors[j.name].nbytes for j in jobs)

    with atomic_dir(out, overwrite) as tmp:
        plan = [j.spec for j in jobs]
        meta = {"total_parameters": n_params}
        with (
            ShardedWriter(tmp, "model", shard_bytes, {"format": "pt"}, plan, meta) as writer,
            progress_bar(total, f"apply α={scale:g}", progress, len(jobs)) as bar,
        ):
            if dev is None:  # every tensor's chunks, computed on worker threads, come back here in order
                tasks = (t for job in jobs for t in _chunk_tasks(job, vec, tgt, patterns.scale_for(job.name),
                                                                  chunk_elems))
                with contextlib.closing(ordered_map(tasks, n_threads)) as results:
                    for job in jobs:
                        w = writer.begin(job.spec)
                        for _ in tgt.chunk_blocks(job.name, chunk_elems):
                            w.write(next(results))
                        tensor_done(bar, tgt.tensors[job.name].nbytes)
            else:
                for job in jobs:
                    _apply_tensor(job, vec, tgt, writer, patterns.scale_for(job.name), dev, chunk_elems)
                    tensor_done(bar, tgt.tensors[job.name].nbytes)
            names = writer.close()
        _copy_side_files(tgt, tmp, out_code)
        output_bytes = sum((tmp / n).stat().st_size for n in names)
    return ApplyResult(
        out=str(out),
        scale=scale,
        device="cpu" if dev is None else str(dev),
        tensors_changed=sum(1 for j in jobs if j.source),
        tensors_copied=sum(1 for j in jobs if not j.source),
        output_bytes=output_bytes,
        seconds=round(time.perf_counter() - t0, 3),
        skipped_vocab_rows=skipped,
        scales={j.name: patterns.scale_for(j.name) for j in jobs if j.source},
    )


def _chunk_tasks(
    job: _Job, vec: VectorFolder | AdapterFolder, tgt: ModelSource, scale: float, chunk_elems: int
) -> Iterator[Callable[[], np.ndarray]]:
    """One task per chunk of the output tensor, in order, each computing it from a fresh read of the target's
    chunk: on the CPU, in numpy, float32 (float64 for F64) arithmetic rounded once, as :func:`_apply_tensor`
    computes it in torch, bit for bit."""
    info = tgt.tensors[job.name]
    blocks = tgt.chunk_blocks(job.name, chunk_elems)
    if job.source is None:
        for block in blocks:
            yield functools.partial(_copy_block, job, tgt, block)
        return
    work = work_code(info.dtype, vec.entries[job.source].source_dtype, job.spec.dtype)
    rows = info.shape[0] if info.shape else 1
    where = str(vec.folder)
    with decoding(where, job.source):
        deltas = vec.delta_tasks_np(job.source, rows, chunk_elems, scale, work)
        for block, delta in zip(blocks, deltas, strict=True):
            yield functools.partial(_apply_block, job, tgt, block, delta, work, where)


def _copy_block(job: _Job, tgt: ModelSource, block: tuple[int, int] | None) -> np.ndarray:
    check_stop()
    info = tgt.tensors[job.name]
    with np.errstate(over="ignore"):  # an overflow to ±inf is reported just below
        c = convert(tgt.read_block_np(job.name, block), info.dtype, job.spec.dtype)
    if info.is_float:  # a model with NaN/Inf is broken whether or not the vector touched the tensor
        check_finite_raw(job.name, c, job.spec.dtype, "target")
    return c


def _apply_block(
    job: _Job, tgt: ModelSource, block: tuple[int, int] | None, delta: Callable[[], RawDelta], work: str,
    where: str,
) -> np.ndarray:
    check_stop()
    info = tgt.tensors[job.name]
    out_code = job.spec.dtype
    assert job.source is not None
    with decoding(where, job.source):
        # c is a fresh array (read, never mapped): widening may return it, and adding in place is safe
        c = tgt.read_block_np(job.name, block)
        d = delta()
        if d.index is not None and out_code == info.dtype:  # sparse: only the changed elements are computed
            res = d.apply_raw(c, info.dtype, work)
        else:
            acc = convert(c, info.dtype, work)
            d.add_to(acc)
            with np.errstate(over="ignore"):  # an overflow to ±inf is reported just below
                res = narrow(acc, out_code)
        check_finite_raw(job.name, res, out_code, "target or vector, after applying")
    return res


def _apply_tensor(
    job: _Job, vec: VectorFolder | AdapterFolder, tgt: ModelSource, writer: ShardedWriter, scale: float,
    dev: torch.device, chunk_elems: int,
) -> None:
    from ._io import ST_TO_TORCH

    w = writer.begin(job.spec)
    info = tgt.tensors[job.name]
    out_dtype = ST_TO_TORCH[job.spec.dtype]
    chunks = tgt.iter_chunks(job.name, chunk_elems)
    if job.source is None:
        for c in chunks:
            c = c if c.dtype == out_dtype else c.to(out_dtype)
            if info.is_float:  # a model with NaN/Inf is broken whether or not the vector touched the tensor
                check_finite(job.name, c, "target")
            w.write(c)
        return
    work = work_dtype(info.dtype, vec.entries[job.source].source_dtype, job.spec.dtype)
    rows = info.shape[0] if info.shape else 1
    deltas = vec.delta_chunks(job.source, rows, chunk_elems, scale, work)
    with decoding(str(vec.folder), job.source):
        for c, d in zip(chunks, deltas, strict=True):
            acc = c.to(dev, work, copy=True)  # never add in place into a tensor that may map the target file
            d.add_to(acc)
            res = acc.to(out_dtype)
            check_finite(job.name, res, "target or vector, after applying")
            w.write(res.cpu())


def _copy_side_files(tgt: ModelSource, folder: Path, out_code: str | None) -> None:
    for path in tgt.side_files():
        dest = folder / path.name
        if path.name == "config.json" and out_code:
            config = read_json(path)
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = _DTYPE_CONFIG_NAME[out_code]
            write_text(dest, json.dumps(config, indent=2) + "\n")
        else:
            copy_file(path, dest)

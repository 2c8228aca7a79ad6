"""θ + α·v on a loaded transformers model, in place: the weights ``rvhub apply`` would write, bit for bit.

The deltas come from the same decoders apply uses (``delta_chunks`` of a vector or adapter folder, one row
block at a time) and are added the same way: the block is taken to float32 (float64 for a float64 tensor),
``DeltaChunk.add_to`` adds it, and the sum is rounded once to the parameter's dtype. Which tensor takes which
delta (tied embeddings, vocabulary rows, shapes) is decided by :func:`rvhub.apply.plan_apply` on a view of
the model's state dict, so tying is handled exactly as apply handles it: a tied model's one embedding
matrix takes the embedding delta once, and a vector with an ``lm_head`` delta is refused for it.

Restoring (:func:`vector_added`) is exact in one of two ways:

- ``restore="copy"`` (the default without a source): the touched parameters are copied to CPU memory first
  and copied back after. Cost: the bytes of every tensor the vector touches, in host memory (for a vector
  over all weights, one more copy of the model).
- ``restore=ModelSource`` (what ``rvhub eval`` uses): the touched tensors are read again from the files the
  model was loaded from and cast to the parameter's dtype. Cost: no extra memory beyond one row block, one
  read of the touched tensors per restore. Only valid when the loaded weights equal the files cast to the
  parameters' dtype; :func:`check_loaded` verifies that once.

:func:`switch_to` (what ``rvhub eval`` uses between runs) goes from one run's deltas to the next's in one pass:
each parameter is computed from the target's files plus the new delta, the bits of restoring and then adding.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from ._io import TORCH_TO_ST
from .card import ModelRef
from .errors import InvalidOptionError, LoadedWeightsError
from .formats import DeltaChunk, check_finite, open_vector, work_dtype
from .sources import CHUNK_ELEMS, ModelSource, TensorInfo, row_blocks

if TYPE_CHECKING:
    from .card import TensorEntry, VectorCard

ControlKind = Literal["gaussian", "permute", "none"]


class Deltas(Protocol):
    """What can be added: a vector or adapter folder, or a control built from one."""

    @property
    def entries(self) -> Mapping[str, TensorEntry]: ...

    @property
    def card(self) -> VectorCard: ...

    def delta_chunks(
        self, name: str, rows: int, chunk_elems: int, scale: float, work: torch.dtype
    ) -> Iterator[DeltaChunk]: ...


@dataclass(frozen=True)
class AddResult:
    """What :func:`add_vector` changed."""

    scale: float
    tensors_changed: list[str]
    skipped_vocab_rows: dict[str, int]


def _params(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state dict, by checkpoint name (a tied head and embedding share one)."""
    return dict(model.state_dict(keep_vars=True))


def _view(model: Any, params: Mapping[str, torch.Tensor]) -> ModelSource:
    """A ModelSource-shaped description of a loaded model, for plan_apply (it reads no file)."""
    tensors = {
        name: TensorInfo(name, TORCH_TO_ST.get(t.dtype, "I64"), tuple(t.shape), Path())
        for name, t in params.items() if t.dtype in TORCH_TO_ST
    }
    config = model.config.to_dict() if hasattr(model, "config") else {}
    return ModelSource(ModelRef(kind="local", id="the loaded model"), Path(), tensors, config)


def plan_model(model: Any, vec: Deltas, allow_vocab_mismatch: bool = False) -> tuple[dict[str, str], dict[str, int]]:
    """(parameter name -> vector entry whose delta it takes, vocab rows skipped), as apply would plan it."""
    from .apply import plan_apply

    params = _params(model)
    jobs, skipped = plan_apply(vec, _view(model, params), None, allow_vocab_mismatch)  # type: ignore[arg-type]
    return {j.name: j.source for j in jobs if j.source is not None}, skipped


def _blocks(shape: tuple[int, ...], chunk_elems: int) -> list[tuple[int, int]]:
    """Flat element ranges of the chunks ModelSource.iter_chunks yields for this shape."""
    numel = math.prod(shape)
    blocks = row_blocks(shape, chunk_elems) if shape and numel else []
    if len(blocks) <= 1:
        return [(0, numel)]
    row = math.prod(shape[1:])
    return [(a * row, b * row) for a, b in blocks]


def _flat(param: torch.Tensor, what: str) -> torch.Tensor:
    data = param.data
    if not data.is_contiguous():
        raise InvalidOptionError("model", what, "parameters must be contiguous to take a vector in place")
    return data.view(-1)


def _base_blocks(base: ModelSource, name: str, like: torch.Tensor, chunk_elems: int) -> Iterator[torch.Tensor]:
    """The target's tensor ``name`` from its files, cast to the parameter's dtype, in the blocks of
    :func:`_blocks` (what restoring by re-reading puts back), on the parameter's device."""
    from ._npbridge import to_torch

    code = base.tensors[name].dtype
    for block in base.chunk_blocks(name, chunk_elems):
        yield to_torch(base.read_block_np(name, block), code).to(device=like.device, dtype=like.dtype)


def _add_tensor(
    param: torch.Tensor, vec: Deltas, source: str, scale: float, chunk_elems: int,
    base: tuple[ModelSource, str] | None = None,
) -> None:
    """param += scale·delta of ``source``, one rounding; with ``base`` (the target's files and the parameter's
    name there), param = base + scale·delta instead: restoring and then adding, in one pass."""
    data = param.data
    flat = _flat(param, source)
    code = TORCH_TO_ST[data.dtype]
    work = work_dtype(code, vec.entries[source].source_dtype)
    rows = data.shape[0] if data.dim() else 1
    deltas = vec.delta_chunks(source, rows, chunk_elems, scale, work)
    blocks = _blocks(tuple(data.shape), chunk_elems)
    bases = _base_blocks(base[0], base[1], data, chunk_elems) if base is not None else None
    for (lo, hi), d in zip(blocks, deltas, strict=True):
        acc = (next(bases) if bases is not None else flat[lo:hi]).to(work, copy=True)
        d.add_to(acc)
        out = flat[lo:hi]
        out.copy_(acc)  # rounds once to the parameter's dtype, as acc.to(dtype) does
        check_finite(source, out, "model or vector, after adding")


def _file_blocks(
    param: torch.Tensor, base: ModelSource, name: str, chunk_elems: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(a flat block of ``param``, the same block of the target's tensor ``name`` from its files, cast to the
    parameter's dtype), one block at a time."""
    flat = _flat(param, name)
    for (lo, hi), block in zip(_blocks(tuple(param.shape), chunk_elems),
                               _base_blocks(base, name, param.data, chunk_elems), strict=True):
        yield flat[lo:hi], block


def _restore_tensor(param: torch.Tensor, base: ModelSource, name: str, chunk_elems: int) -> None:
    """param = the target's tensor ``name`` from its files, cast to the parameter's dtype, one block at a time."""
    for part, block in _file_blocks(param, base, name, chunk_elems):
        part.copy_(block)


@torch.no_grad()
def add_vector(
    model: Any,
    vector: str | Path | Deltas,
    scale: float = 1.0,
    *,
    allow_vocab_mismatch: bool = False,
    chunk_elems: int = CHUNK_ELEMS,
) -> AddResult:
    """Add ``scale``·v to a loaded transformers model's parameters in place, on whatever device they are on.

    float32 arithmetic, rounded once to each parameter's dtype: the weights equal what ``rvhub apply`` writes
    for the same base, scale and dtype, bit for bit. ``vector``: a vector or adapter folder (its files are
    checked against the card first) or an opened one. To undo it exactly, use :func:`vector_added`.
    """
    if not math.isfinite(scale):
        raise InvalidOptionError("scale", scale, "must be a finite number")
    vec = open_vector(Path(vector)) if isinstance(vector, str | Path) else vector
    plan, skipped = plan_model(model, vec, allow_vocab_mismatch)
    params = _params(model)
    for name, source in plan.items():
        _add_tensor(params[name], vec, source, scale, chunk_elems)
    return AddResult(scale, sorted(plan), skipped)


@contextmanager
def vector_added(
    model: Any,
    vector: str | Path | Deltas,
    scale: float = 1.0,
    *,
    restore: Literal["copy"] | ModelSource = "copy",
    allow_vocab_mismatch: bool = False,
) -> Iterator[AddResult]:
    """``with vector_added(model, VEC, α):`` the model holds θ + α·v inside, its original weights after (bit
    for bit, also when the block raises). ``restore``: ``"copy"`` keeps CPU copies of the touched tensors;
    a :class:`ModelSource` of the files the model was loaded from re-reads them instead (no extra memory)."""
    vec = open_vector(Path(vector)) if isinstance(vector, str | Path) else vector
    plan, _ = plan_model(model, vec, allow_vocab_mismatch)
    params = _params(model)
    copies: dict[str, torch.Tensor] = {}
    if restore == "copy":
        copies = {name: params[name].detach().to("cpu", copy=True) for name in plan}
    try:
        yield add_vector(model, vec, scale, allow_vocab_mismatch=allow_vocab_mismatch)
    finally:
        with torch.no_grad():
            for name in plan:
                if isinstance(restore, ModelSource):
                    _restore_tensor(params[name], restore, name, CHUNK_ELEMS)
                else:
                    params[name].data.copy_(copies[name])


# switch_to's blocks: smaller than apply's, so that what each worker thread holds at once (the target's block,
# its float32 sum, the delta) stays a few MB; the weights do not depend on the block size
SWITCH_CHUNK_ELEMS = CHUNK_ELEMS // 4


@torch.no_grad()
def switch_to(
    model: Any,
    base: ModelSource,
    deltas: Deltas | None,
    scale: float = 1.0,
    touched: Collection[str] = (),
    *,
    allow_vocab_mismatch: bool = False,
    threads: int | None = None,
    chunk_elems: int = SWITCH_CHUNK_ELEMS,
) -> list[str]:
    """Make the model hold target + ``scale``·deltas (``deltas`` None: the target), whatever earlier deltas it
    holds on the parameters ``touched``, in one pass per tensor: each parameter the new deltas take is computed
    from the target's files (``base``), not from its current value, and each one only ``touched`` is read back.
    The weights are those of restoring and then :func:`add_vector`, bit for bit. Returns the parameters that
    now differ from the target's files (the next call's ``touched``).

    Only valid when the loaded weights equal the files cast to the parameters' dtype (:func:`check_loaded`).
    Tensors are done on ``threads`` worker threads (default :func:`rvhub._parallel.worker_threads`): decoding,
    drawing a control's noise and torch's elementwise work release the GIL.
    """
    from ._parallel import ordered_map, worker_threads

    if not math.isfinite(scale):
        raise InvalidOptionError("scale", scale, "must be a finite number")
    plan = plan_model(model, deltas, allow_vocab_mismatch)[0] if deltas is not None else {}
    params = _params(model)
    jobs: list[tuple[int, Callable[[], None]]] = []
    for name in sorted(set(touched) - set(plan)):
        jobs.append((params[name].numel(), functools.partial(_restore_tensor, params[name], base, name, chunk_elems)))
    for name, source in plan.items():
        assert deltas is not None
        jobs.append((params[name].numel(), functools.partial(
            _add_tensor, params[name], deltas, source, scale, chunk_elems, (base, name))))
    # largest first: a long tensor (the embedding) overlaps with the others instead of ending alone
    jobs.sort(key=lambda job: -job[0])
    for _ in ordered_map((job for _, job in jobs), worker_threads(threads)):
        pass
    return sorted(plan)


def check_loaded(model: Any, source: ModelSource, names: list[str]) -> None:
    """Raise LoadedWeightsError unless each named parameter equals the source's tensor cast to its dtype
    (what restoring by re-reading assumes)."""
    params = _params(model)
    for name in names:
        # one row block at a time: never a whole tensor (an embedding) read and cast beside the model
        for part, block in _file_blocks(params[name].detach(), source, name, CHUNK_ELEMS):
            if not torch.equal(part, block):
                raise LoadedWeightsError(name, str(source.ref.id))


_SAMPLE_WINDOW = 1 << 12  # elements per window of widen_from_files's check (a few pages of the mapped file)
_SAMPLE_WINDOWS = 16


def widen_from_files(
    model: Any, source: ModelSource, dtype: torch.dtype, chunk_elems: int = CHUNK_ELEMS
) -> set[str] | None:
    """Widen a model loaded from ``source``'s files in a narrower dtype (its mapped pages not yet read) to
    ``dtype``, reading each floating tensor again from the files, one row block at a time: the weights
    ``from_pretrained(dtype=dtype)`` gives, bit for bit (widening is exact), without that load's peak (the
    file's mapped pages and the widened copy resident at once: 3.2 GB for a 0.5B bf16 model in float32,
    against 2.3 GB after it). The state-dict names of the tensors it widened (their values are the files' by
    construction); None, with nothing changed, when a floating tensor of the state
    dict is not in the files under its name and shape (from_pretrained then initialises or converts it, and
    only a load in ``dtype`` gives its values), or when a sample of the loaded values differs from the files'
    (a loader that transforms weights: the first, last and 16 evenly spaced windows of 4,096 elements of each
    tensor are compared, which reads a few pages of it, not the tensor)."""
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, t in _params(model).items():  # a tied head and embedding are one tensor under two names
        if t.is_floating_point():
            groups.setdefault(id(t), (t, []))[1].append(name)
    jobs: list[tuple[torch.Tensor, str]] = []
    widened: set[str] = set()
    for t, names in groups.values():
        found = [n for n in names if n in source.tensors and source.tensors[n].shape == tuple(t.shape)]
        if not found:
            return None
        if t.dtype != dtype:  # one the loader already holds in ``dtype`` stays as loaded
            jobs.append((t, found[0]))
            widened.update(names)
    for t, name in jobs:
        if not _sample_matches(t.detach(), source, name):
            return None
    for t, name in jobs:
        wide = torch.empty(tuple(t.shape), dtype=dtype, device=t.device)
        _restore_tensor(wide, source, name, chunk_elems)
        t.data = wide  # the narrow (mapped) storage is dropped unread
    if hasattr(model, "config"):
        model.config.dtype = dtype  # as from_pretrained(dtype=...) records it
    return widened


def _sample_matches(t: torch.Tensor, source: ModelSource, name: str) -> bool:
    """Whether windows of the loaded tensor equal the files' values cast to its dtype."""
    flat = t.reshape(-1)
    n = flat.numel()
    if n <= (_SAMPLE_WINDOWS + 2) * _SAMPLE_WINDOW:
        starts, width = [0], n
    else:
        step = (n - _SAMPLE_WINDOW) // (_SAMPLE_WINDOWS + 1)
        starts = [i * step for i in range(_SAMPLE_WINDOWS + 2)]
        width = _SAMPLE_WINDOW
    for s in starts:
        if not torch.equal(flat[s : s + width].cpu(), source.read_span(name, s, width).to(t.dtype)):
            return False
    return True


# ---------------------------------------------------------------- controls


def _dense_blocks(vec: Deltas, name: str) -> Iterator[torch.Tensor]:
    """The delta of ``name`` in float32 (float64 for float64 tensors), flat, one row block at a time."""
    entry = vec.entries[name]
    work = work_dtype(entry.source_dtype)
    shape = tuple(entry.shape)
    rows = shape[0] if shape else 1
    for (lo, hi), d in zip(_blocks(shape, CHUNK_ELEMS), vec.delta_chunks(name, rows, CHUNK_ELEMS, 1.0, work),
                           strict=True):
        block = torch.zeros(hi - lo, dtype=work)
        d.add_to(block)
        yield block


def _dense(vec: Deltas, name: str) -> torch.Tensor:
    """The whole delta of ``name``, flat, in the vector's shape (see :func:`_dense_blocks`)."""
    blocks = list(_dense_blocks(vec, name))
    return torch.cat(blocks) if blocks else torch.zeros(0, dtype=work_dtype(vec.entries[name].source_dtype))


def _seed(seed: int, name: str) -> int:
    """A per-tensor seed: the control of one tensor does not depend on which other tensors the vector has."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sum_of_squares(vec: Deltas, name: str) -> float:
    """Σ v² over tensor ``name``, in float64, one row block at a time (never the whole tensor dense)."""
    return sum(_square_sum(block) for block in _dense_blocks(vec, name))


def _square_sum(block: torch.Tensor) -> float:
    """Σ x² of one block in float64 (squared in place: one float64 copy of the block, not two)."""
    return float(block.to(torch.float64, copy=True).square_().sum())  # a copy also for a float64 block


_KEEP_NOISE_ELEMS = 1 << 24  # a tensor's noise up to 64 MB (float32) is kept between its two passes


class Control:
    """A seeded random vector r with v's per-tensor L2 norm, built lazily one tensor at a time.

    ``gaussian``: per tensor, standard normal noise rescaled to ‖v_t‖₂ (the construction of the paper's
    authors). It is streamed: the noise is drawn in blocks of :data:`CHUNK_ELEMS` (a multiple of 16, so the
    draws equal one ``torch.randn`` of the whole tensor with the same generator), once to measure its norm
    and once more to be added (a tensor of up to 16M elements keeps its draws instead), and ‖v_t‖₂ is summed
    block by block: a large tensor (an embedding of 136M elements would take 0.5 GB per float32 copy) is
    never held whole. ``permute``: v's own values of each tensor, shuffled within the tensor (this one holds
    the tensor and its permutation in memory).
    """

    def __init__(self, vec: Deltas, kind: Literal["gaussian", "permute"], seed: int = 0):
        self.vec = vec
        self.kind = kind
        self.seed = seed
        self._entries = vec.entries
        self._cache: tuple[str, torch.Tensor] | None = None
        self._factors: dict[str, float] = {}

    @property
    def entries(self) -> Mapping[str, TensorEntry]:
        return self._entries

    @property
    def card(self) -> VectorCard:
        """The card of the vector whose norms r takes (plan_apply reads its tying)."""
        return self.vec.card

    def tensor(self, name: str) -> torch.Tensor:
        """r for tensor ``name``, flat, float32 (float64 for float64 tensors), whole."""
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        if self.kind == "permute":
            v = _dense(self.vec, name)
            gen = torch.Generator().manual_seed(_seed(self.seed, name))
            r = v[torch.randperm(v.numel(), generator=gen)]
        else:
            blocks = list(self._gaussian(name))
            r = torch.cat(blocks) if blocks else torch.empty(0, dtype=work_dtype(self.entries[name].source_dtype))
        self._cache = (name, r)
        return r

    def _noise(self, name: str) -> Iterator[torch.Tensor]:
        """The standard normal draws of tensor ``name``, block by block."""
        entry = self.entries[name]
        numel = math.prod(entry.shape)
        gen = torch.Generator().manual_seed(_seed(self.seed, name))
        for lo in range(0, numel, CHUNK_ELEMS):
            yield torch.randn(min(CHUNK_ELEMS, numel - lo), generator=gen, dtype=work_dtype(entry.source_dtype))

    def _gaussian(self, name: str) -> Iterator[torch.Tensor]:
        """r of tensor ``name``, block by block: the noise rescaled to ‖v_t‖₂ (zeros where v_t or the noise is 0)."""
        factor = self._factors.get(name)
        kept: list[torch.Tensor] | None = None
        if factor is None:
            norm_v = math.sqrt(_sum_of_squares(self.vec, name))
            small = math.prod(self.entries[name].shape) <= _KEEP_NOISE_ELEMS  # keep its draws, not draw twice
            kept = [] if small else None
            sq = 0.0
            for x in self._noise(name):
                sq += _square_sum(x)
                if kept is not None:
                    kept.append(x)
            norm_r = math.sqrt(sq)
            factor = self._factors[name] = norm_v / norm_r if norm_r > 0 else 0.0
        for x in kept if kept is not None else self._noise(name):
            yield x * factor if factor else torch.zeros_like(x)

    def _flat(self, name: str) -> Iterator[torch.Tensor]:
        return iter([self.tensor(name)]) if self.kind == "permute" else self._gaussian(name)

    def delta_chunks(
        self, name: str, rows: int, chunk_elems: int, scale: float, work: torch.dtype
    ) -> Iterator[DeltaChunk]:
        """α·r in the row blocks of a target with ``rows`` rows, as VectorFolder.delta_chunks (dense)."""
        entry = self.entries[name]
        vrows = entry.shape[0] if entry.shape else 1
        row = math.prod(entry.shape[1:])
        stream = _Sequential(self._flat(name))
        shape = (rows, *entry.shape[1:]) if entry.shape else ()
        none = torch.empty(0, dtype=torch.int64)
        for lo, hi in _blocks(shape, chunk_elems):
            a, b = (lo // row, hi // row) if entry.shape and row else (0, vrows)
            values = stream.take(a * row, min(b, vrows) * row) if b > a else torch.empty(0, dtype=work)
            if scale != 1.0:  # a copy: the stream's blocks may still be read by the next take
                values = values.to(work, copy=True).mul_(scale)
            else:  # only read by DeltaChunk.add_to
                values = values.to(work)
            yield DeltaChunk(None, values, none, torch.empty(0, dtype=work))


class _Sequential:
    """Elements ``[lo, hi)`` of a flat tensor given as a stream of blocks, asked for in increasing order."""

    def __init__(self, blocks: Iterator[torch.Tensor]):
        self._blocks = blocks
        self._buf: list[torch.Tensor] = []
        self._start = 0  # flat index of the first element held in _buf
        self._held = 0

    def take(self, lo: int, hi: int) -> torch.Tensor:
        while self._start + self._held < hi:
            block = next(self._blocks)
            self._buf.append(block)
            self._held += block.numel()
        while self._buf and self._start + self._buf[0].numel() <= lo:  # blocks wholly before lo are done
            first = self._buf.pop(0)
            self._start += first.numel()
            self._held -= first.numel()
        joined = torch.cat(self._buf) if len(self._buf) > 1 else self._buf[0]
        return joined[lo - self._start : hi - self._start]

"""Vector algebra: ``combine`` (sum, TIES, DARE) and per-tensor scale patterns.

Every method works tensor by tensor in float32 (float64 for float64 tensors); weights, densities and α are
rounded to that dtype first, and each operation below is one IEEE rounding, so the stored result is exactly
what the formula gives in that arithmetic.

- ``sum``: ``c = ((w₁·v₁) + w₂·v₂) + …``, left to right.
- ``dare`` (Yu et al. 2023): per input and tensor, keep each element with probability D (``rand < D``, a
  generator seeded from the seed, the input's position and the tensor name), divide the kept ones by D, then
  ``sum``. With D = 1 nothing is dropped and ``v/1 = v``: dare is then sum, bit for bit.
- ``ties`` (Yadav et al. 2023): trim each vᵢ to its ⌈D·n⌉ largest magnitudes per tensor (ties at the
  threshold broken by flat index, lower first); uᵢ = wᵢ·t̂ᵢ; the elected sign is ``sign(Σ uᵢ)``; the result is
  the disjoint mean ``Σ_{i∈A} uᵢ / |A|`` over A = {i: sign(uᵢ) = elected sign}, 0 where A is empty.
  Where the weighting goes matters: the paper has no per-model weights (one λ scales the merged vector), so
  its election counts each trimmed vector as it is. Weighting *before* the election, as here and in
  mergekit (its issue #474), lets a heavily weighted vector win the sign of an element that unweighted
  vectors would give the other way; with equal positive weights both readings elect the same signs. mergekit
  also divides by Σ_{i∈A} wᵢ instead of |A|; here the mean is the paper's count, scaled by the weights.

Scale patterns (``--scale-pattern REGEX=α``): the first REGEX that ``re.search`` finds in a tensor's name
gives its α; tensors no pattern matches get the plain ``--scale``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._combine_io import open_writer, write_tensor
from .errors import IncompatibleInputsError, InvalidOptionError, ShapeMismatchError, VectorFormatError

if TYPE_CHECKING:
    import torch

    from .card import Fingerprints, TensorEntry, VectorCard
    from .formats import VectorFolder

logger = logging.getLogger(__name__)

Method = Literal["sum", "ties", "dare"]
METHODS = ("sum", "ties", "dare")


# ---------------------------------------------------------------- scale patterns


class ScalePatterns:
    """``REGEX=α`` rules, in order: :meth:`scale_for` gives the α of the first rule whose REGEX
    ``re.search``-matches a tensor name, else ``default``. Parse once, reuse for every tensor."""

    def __init__(self, rules: Sequence[tuple[str, float]] = (), default: float = 1.0):
        if not math.isfinite(default):
            raise InvalidOptionError("--scale", default, "must be a finite number")
        self.default = float(default)
        self.rules: list[tuple[str, float]] = []
        self._compiled: list[tuple[re.Pattern[str], float]] = []
        for pattern, alpha in rules:
            spec = f"{pattern}={alpha}"
            if not pattern:
                raise InvalidOptionError("--scale-pattern", spec, "the REGEX before '=' is empty")
            if not math.isfinite(alpha):
                raise InvalidOptionError("--scale-pattern", spec, "α must be a finite number")
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise InvalidOptionError("--scale-pattern", spec, f"not a valid regular expression ({e})") from e
            self.rules.append((pattern, float(alpha)))
            self._compiled.append((compiled, float(alpha)))

    @classmethod
    def parse(cls, specs: Iterable[str] = (), default: float = 1.0) -> ScalePatterns:
        """From ``REGEX=α`` strings (split at the last ``=``, so a REGEX may hold ``=`` itself)."""
        rules = []
        for spec in specs:
            pattern, eq, alpha_text = spec.rpartition("=")
            if not eq:
                raise InvalidOptionError("--scale-pattern", spec, "use REGEX=α, e.g. 'layers\\.(0|1)\\.=0.5'")
            try:
                alpha = float(alpha_text)
            except ValueError:
                raise InvalidOptionError(
                    "--scale-pattern", spec, f"α {alpha_text!r} after the last '=' is not a number"
                ) from None
            rules.append((pattern, alpha))
        return cls(rules, default)

    @classmethod
    def of(cls, patterns: ScalePatterns | Iterable[str] | None, default: float = 1.0) -> ScalePatterns:
        """``patterns`` as it is, or parsed from strings, with ``default`` for the rest."""
        if isinstance(patterns, ScalePatterns):
            return patterns if patterns.default == default else cls(patterns.rules, default)
        return cls.parse(patterns or (), default)

    def scale_for(self, name: str) -> float:
        for compiled, alpha in self._compiled:
            if compiled.search(name):
                return alpha
        return self.default

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        return f"ScalePatterns({self.rules!r}, default={self.default!r})"


# ---------------------------------------------------------------- combine: options and inputs


@dataclass(frozen=True)
class CombineResult:
    """What ``combine`` wrote."""

    out: str
    method: str
    inputs: list[str]
    weights: list[float]
    density: float | None
    seed: int | None
    exact: bool
    tensors: int
    unchanged_tensors: int
    elements: int
    changed_elements: int
    fixups: int
    vector_bytes: int
    seconds: float
    scales: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_weights(text: str | Sequence[float] | None) -> list[float] | None:
    """``"1,0.5,-1"`` (or a list) as floats; each must be finite."""
    if text is None:
        return None
    parts: Sequence[Any] = [p.strip() for p in text.split(",")] if isinstance(text, str) else text
    out = []
    for p in parts:
        try:
            w = float(p)
        except (TypeError, ValueError):
            raise InvalidOptionError("--weights", text, f"{p!r} is not a number; use e.g. 1,0.5") from None
        if not math.isfinite(w):
            raise InvalidOptionError("--weights", text, "every weight must be a finite number")
        out.append(w)
    return out


def _check_options(
    n: int, weights: list[float] | None, method: str, density: float | None, seed: int | None
) -> list[float]:
    if method not in METHODS:
        raise InvalidOptionError("--method", method, "use sum, ties or dare")
    if n == 0:
        raise InvalidOptionError("vectors", "none", "give at least one vector")
    if method == "ties" and n < 2:
        raise InvalidOptionError("vectors", f"{n} input", "ties elects signs among inputs: give at least two")
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n:
        raise InvalidOptionError("--weights", ",".join(f"{w:g}" for w in weights),
                                 f"give one weight per vector: {n} vectors, {len(weights)} weights")
    if method == "sum":
        if density is not None:
            raise InvalidOptionError("--density", density, "only ties and dare take a density")
    elif density is None:
        raise InvalidOptionError("--density", None, f"{method} needs --density D, 0 < D ≤ 1 (the kept fraction)")
    elif not (0 < density <= 1) or not math.isfinite(density):
        raise InvalidOptionError("--density", density, "must be in (0, 1]: the fraction of elements kept")
    if seed is not None and method != "dare":
        raise InvalidOptionError("--seed", seed, "only dare draws random numbers")
    return weights


@dataclass
class _Input:
    ref: str  # repo@commit or the folder as given
    folder: VectorFolder
    card_sha256: str

    @property
    def card(self) -> VectorCard:
        return self.folder.card


def _open_input(spec: str | Path, registry: Any, progress: bool) -> _Input:
    """A local vector folder, or a registry repo id pulled (and verified) first. Adapter folders are refused."""
    from .card import CARD_FILE, VectorCard
    from .formats import VectorFolder

    path = Path(spec)
    ref = str(spec)
    if not path.exists():
        from .registry import VectorRef, pull

        try:
            VectorRef.parse(ref)
        except InvalidOptionError:
            raise VectorFormatError(ref, "no such folder, and not a registry repo id (org/name[@rev])") from None
        pulled = pull(ref, registry=registry, progress=progress)
        path, ref = Path(pulled.path), f"{pulled.repo_id}@{pulled.commit}"
    if VectorCard.read(path).format == "lora":
        raise VectorFormatError(
            ref, "a LoRA adapter folder cannot be combined (its factors are not the vector); combine the sparse "
            "or dense vectors it was compressed from, then `rvhub compress` the result"
        )
    folder = VectorFolder(path, verify=True)  # every file checked against the card's sha256
    card_sha = hashlib.sha256((path / CARD_FILE).read_bytes()).hexdigest()
    return _Input(ref, folder, card_sha)


def _open_inputs(specs: Sequence[str | Path], registry: Any, progress: bool) -> list[_Input]:
    """:func:`_open_input` of each; local folders on two threads (hashing their files releases the GIL)."""
    if len(specs) < 2 or not all(Path(s).exists() for s in specs):
        return [_open_input(s, registry, progress) for s in specs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2, thread_name_prefix="rvhub-verify") as pool:
        return list(pool.map(lambda s: _open_input(s, registry, progress), specs))


def _torch_threads() -> contextlib.AbstractContextManager[None]:
    """ties and dare compute in torch, on one thread (see :func:`rvhub.extract._one_torch_thread`)."""
    from .extract import _one_torch_thread

    return _one_torch_thread()


def _names(card: VectorCard) -> set[str]:
    return {t.name for t in card.tensors} | set(card.unchanged)


def _check_inputs(inputs: list[_Input], force: bool) -> bool:
    """Same tensors, shapes and dtypes (always), compatible `from` fingerprints (unless ``force``).
    Returns whether a fingerprint difference was forced through."""
    first = inputs[0]
    forced = False
    for other in inputs[1:]:
        a, b = first.card, other.card
        if a.tie_word_embeddings != b.tie_word_embeddings:
            raise IncompatibleInputsError(first.ref, other.ref, f"tie_word_embeddings {a.tie_word_embeddings} vs "
                                          f"{b.tie_word_embeddings}")
        na, nb = _names(a), _names(b)
        if na != nb:
            only_a, only_b = sorted(na - nb), sorted(nb - na)
            what = f"{only_a[0]} only in the first" if only_a else f"{only_b[0]} only in the second"
            raise IncompatibleInputsError(first.ref, other.ref, f"their tensors differ ({what})")
        ea, eb = first.folder.entries, other.folder.entries
        for name in sorted(set(ea) & set(eb)):
            if ea[name].shape != eb[name].shape:
                raise ShapeMismatchError(name, ea[name].shape, eb[name].shape, first.ref, other.ref)
            if ea[name].source_dtype != eb[name].source_dtype:
                raise IncompatibleInputsError(first.ref, other.ref, f"{name} is {ea[name].source_dtype} in the first "
                                              f"and {eb[name].source_dtype} in the second")
        problem = _fingerprint_difference(a.fingerprints, b.fingerprints)
        if problem:
            if not force:
                raise IncompatibleInputsError(first.ref, other.ref, problem, forceable=True)
            logger.warning("%s and %s: %s (combined anyway: --force)", first.ref, other.ref, problem)
            forced = True
    return forced


def _fingerprint_difference(a: Fingerprints | None, b: Fingerprints | None) -> str | None:
    """The first way the two `from` models differ in what the fingerprints record, or None."""
    from .compat import LINEAGE_PASS, _pearson, sketch_values

    if a is None or b is None:
        return "a card has no `from` fingerprints, so the `from` models cannot be compared"
    if a.architecture.model_type != b.architecture.model_type:
        return f"`from` model_type {a.architecture.model_type} vs {b.architecture.model_type}"
    if a.config.sha256 != b.config.sha256:
        keys = sorted(set(a.config.values) | set(b.config.values))
        k = next(k for k in keys if a.config.values.get(k) != b.config.values.get(k))
        return f"`from` config field {k}: {a.config.values.get(k)!r} vs {b.config.values.get(k)!r}"
    ta, tb = a.tokenizer, b.tokenizer
    if (ta is None) != (tb is None) or (ta and tb and ta.vocab_sha256 != tb.vocab_sha256):
        return "the `from` models' vocabularies differ"
    sa = {(t.name, t.shape, tuple(t.spans)): t for t in a.lineage.tensors}
    rs = []
    for t in b.lineage.tensors:
        u = sa.get((t.name, t.shape, tuple(t.spans)))
        if u is not None:
            r = _pearson(sketch_values(u), sketch_values(t))
            if r is not None:
                rs.append(r)
    if not rs:
        return "the `from` models' lineage sketches share no sampled positions"
    r = sum(rs) / len(rs)
    if r < LINEAGE_PASS:
        return f"the `from` models' sampled weights correlate at {r:.3f} (below {LINEAGE_PASS}: not siblings)"
    return None


# ---------------------------------------------------------------- combine


def combine(
    vectors: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | str | None = None,
    method: Method | str = "sum",
    density: float | None = None,
    seed: int | None = None,
    scale: float = 1.0,
    scale_patterns: ScalePatterns | Iterable[str] | None = None,
    force: bool = False,
    overwrite: bool = False,
    registry: Any = None,
    max_shard_size: str | int = "2GB",
    progress: bool = True,
) -> CombineResult:
    """Combine vectors (folders or registry repo ids) into the sparse vector folder ``out``; see the module
    docstring for each method's exact definition. α (``scale``, ``scale_patterns``) multiplies the result."""
    from ._combine_sum import sum_tensors
    from ._io import atomic_dir, check_output, parse_size
    from ._progress import progress_bar, tensor_done
    from .card import CombineInput, Provenance, ScalePatternEntry, VectorCard, file_entries

    t0 = time.perf_counter()
    out = Path(out)
    w = _check_options(len(vectors), parse_weights(weights), method, density, seed)
    seed = (seed if seed is not None else 0) if method == "dare" else None
    patterns = ScalePatterns.of(scale_patterns, scale)
    shard_bytes = parse_size(max_shard_size)
    check_output(out, overwrite, [Path(v) for v in vectors if Path(v).exists()])
    inputs = _open_inputs(vectors, registry, progress)
    check_output(out, overwrite, [i.folder.folder for i in inputs])
    forced = _check_inputs(inputs, force)

    names = sorted(set().union(*(set(i.folder.entries) for i in inputs)))
    all_names = sorted(_names(inputs[0].card))
    in_bytes = {n: 4 * sum(_numel(i.folder.entries[n].shape) for i in inputs if n in i.folder.entries)
                for n in names}
    entries: list[TensorEntry] = []
    # sum computes in numpy (without torch); ties and dare in torch, one thread
    with atomic_dir(out, overwrite) as tmp, contextlib.nullcontext() if method == "sum" else _torch_threads():
        writer = open_writer(tmp, {n: tuple(_entry(inputs, n).shape) for n in names}, shard_bytes)
        with writer, progress_bar(sum(in_bytes.values()), f"combine {method}", progress, len(names)) as bar:
            scales = {name: patterns.scale_for(name) for name in names}
            if method == "sum":
                results = sum_tensors(names, [i.folder for i in inputs], w, [scales[n] for n in names], writer)
            else:
                results = (write_tensor(_entry(inputs, name), _combine_tensor(name, inputs, w, method, density,
                                                                              seed, scales[name]), writer)
                           for name in names)
            for name, entry in zip(names, results, strict=True):
                if entry is not None:
                    entries.append(entry)
                tensor_done(bar, in_bytes[name])
            files = file_entries(tmp, writer.close())
        first = inputs[0].card
        provenance = Provenance(
            expression=_expression(w, method),
            method=method,  # type: ignore[arg-type]
            density=density,
            seed=seed,
            inputs=[CombineInput(ref=i.ref, card_sha256=i.card_sha256, weight=wi, source_from=i.card.source_from,
                                 source_to=i.card.source_to) for i, wi in zip(inputs, w, strict=True)],
            scale=patterns.default,
            scale_patterns=[ScalePatternEntry(pattern=p, alpha=a) for p, a in patterns.rules],
            forced=forced,
        )
        kept = {e.name for e in entries}
        card = VectorCard(
            formula="combination",
            format="sparse",
            values_dtype="source",
            exact=all(i.card.exact for i in inputs),
            source_from=first.source_from,
            source_to=first.source_to,
            model_type=first.model_type,
            tie_word_embeddings=first.tie_word_embeddings,
            tensors=entries,
            unchanged=[n for n in all_names if n not in kept],
            files=files,
            fingerprints=_fingerprints(first.fingerprints, entries),
            recommended_bases=first.recommended_bases,
            provenance=provenance,
        )
        card.write(tmp)
    return CombineResult(
        out=str(out), method=method, inputs=[i.ref for i in inputs], weights=w, density=density, seed=seed,
        exact=card.exact, tensors=len(entries), unchanged_tensors=len(card.unchanged),
        elements=sum(_numel(e.shape) for e in entries), changed_elements=sum(e.changed for e in entries),
        fixups=sum(e.fixups for e in entries), vector_bytes=sum(f.size for f in files),
        seconds=round(time.perf_counter() - t0, 3), scales=scales,
    )


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _expression(w: list[float], method: str) -> str:
    terms = " + ".join(f"{wi:g}·v{i + 1}" for i, wi in enumerate(w)).replace("+ -", "− ")
    return terms if method == "sum" else f"{method}({terms})"


def _fingerprints(fp: Fingerprints | None, entries: list[Any]) -> Fingerprints | None:
    """The first input's `from` fingerprints, its architecture part over the tensors the result touches."""
    if fp is None:
        return None
    from .card import ArchitectureFingerprint, TensorShape, architecture_sha256

    shapes = [TensorShape(name=e.name, shape=e.shape) for e in sorted(entries, key=lambda e: e.name)]
    arch = ArchitectureFingerprint(
        model_type=fp.architecture.model_type, tensors=shapes,
        sha256=architecture_sha256(fp.architecture.model_type, shapes), shape_hash=fp.architecture.shape_hash,
    )
    return fp.model_copy(update={"architecture": arch})


# ---------------------------------------------------------------- the arithmetic, one tensor at a time


def _entry(inputs: list[_Input], name: str) -> TensorEntry:
    """The first input's entry of a tensor (every input that stores it has the same shape and dtype)."""
    return next(i.folder.entries[name] for i in inputs if name in i.folder.entries)


def _work(inputs: list[_Input], name: str) -> torch.dtype:
    from .formats import work_dtype

    return work_dtype(*(i.folder.entries[name].source_dtype for i in inputs if name in i.folder.entries))


def _scalar(x: float, work: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the work dtype once, as a 0-d tensor: every product below is then one rounding."""
    import torch

    return torch.tensor(x, dtype=work)


def _combine_tensor(
    name: str, inputs: list[_Input], w: list[float], method: str, density: float | None, seed: int | None,
    alpha: float,
) -> list[torch.Tensor]:
    """The result of ties or dare for tensor ``name``, flat, in the row blocks of
    :func:`rvhub.sources.row_blocks` (sum: :func:`rvhub._combine_sum.sum_tensor`)."""
    import torch

    from .sources import CHUNK_ELEMS, row_blocks

    work = _work(inputs, name)
    shape = _entry(inputs, name).shape
    if _numel(shape) == 0:
        return []  # an empty tensor has no delta to store
    row_elems = _numel(shape[1:])
    blocks = row_blocks(shape, CHUNK_ELEMS) if shape else [(0, 1)]
    sizes = [(b - a) * row_elems for a, b in blocks] if shape else [1]
    full = [
        inp.folder.dense(name, work).reshape(-1) if name in inp.folder.entries else
        torch.zeros(_numel(shape), dtype=work)
        for inp in inputs
    ]
    assert density is not None
    out = _dare(full, w, density, seed or 0, name) if method == "dare" else _ties(full, w, density)
    result = list(torch.split(out, sizes))
    if alpha != 1.0:
        a_t = _scalar(alpha, work)
        result = [r * a_t for r in result]
    return result


def dare_keep(numel: int, density: float, seed: int, index: int, name: str) -> torch.Tensor:
    """dare's keep mask for input ``index`` (0-based) and tensor ``name``: ``rand < D`` from a generator seeded
    with the first 8 bytes of sha256(f"{seed}:{index}:{name}"), so it depends on neither chunking nor order."""
    import torch

    digest = hashlib.sha256(f"{seed}:{index}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(numel, generator=g, dtype=torch.float64) < density


def _dare(full: list[torch.Tensor], w: list[float], density: float, seed: int, name: str) -> torch.Tensor:
    import torch

    work = full[0].dtype
    d = _scalar(density, work)
    acc = torch.zeros_like(full[0])
    for i, (v, wi) in enumerate(zip(full, w, strict=True)):
        keep = dare_keep(v.numel(), density, seed, i, name)
        r = torch.where(keep, v / d, torch.zeros((), dtype=work))
        if wi != 1.0:
            r = r * _scalar(wi, work)
        acc += r
    return acc


def ties_trim(v: torch.Tensor, density: float) -> torch.Tensor:
    """``v`` (flat) with all but its ⌈D·n⌉ largest magnitudes set to 0; equal magnitudes at the threshold are
    kept lowest flat index first."""
    import torch

    n = v.numel()
    k = min(n, math.ceil(density * n))
    if k >= n:
        return v
    mag = v.abs()
    thr = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    keep = mag > thr
    need = k - int(keep.sum())
    if need > 0:
        keep[(mag == thr).nonzero().reshape(-1)[:need]] = True
    return torch.where(keep, v, torch.zeros((), dtype=v.dtype))


def _ties(full: list[torch.Tensor], w: list[float], density: float) -> torch.Tensor:
    import torch

    work = full[0].dtype
    zero = torch.zeros((), dtype=work)
    us = []
    for v, wi in zip(full, w, strict=True):
        t = ties_trim(v, density)
        us.append(t * _scalar(wi, work) if wi != 1.0 else t)
    total = torch.zeros_like(full[0])
    for u in us:
        total += u
    elected = torch.sign(total)
    num = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for u in us:
        agree = (torch.sign(u) == elected) & (elected != 0)
        num += torch.where(agree, u, zero)
        count += agree.to(work)
    return torch.where(count > 0, num / torch.where(count > 0, count, 1), zero)

"""``compress``: a vector → a PEFT LoRA adapter (truncated SVD of each linear weight's delta) + an exact residual.

Per module ``ΔW ≈ B·A`` with ``B = U_r·√S_r`` and ``A = √S_r·V_rᵀ`` and ``lora_alpha = r``, so PEFT's scale
is exactly 1. What LoRA cannot hold as a delta (norm weights, biases and, by default, the embeddings) is
copied, in the source vector's own exact encoding, into ``residual.safetensors``, which ``rvhub apply`` uses
and PEFT ignores. The report says what each part carries as fractions of ‖v‖².
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ._io import (
    ST_TO_TORCH,
    TORCH_TO_ST,
    SafetensorsFileWriter,
    TensorSpec,
    atomic_dir,
    check_output,
    check_stop,
    dtype_code,
)
from ._progress import progress_bar, tensor_done
from ._untrusted import decoding
from .apply import resolve_device
from .card import HUB_ID_PATTERN, CompressionReport, ModuleReport, SvdCheck, VectorCard, file_entries
from .errors import InvalidOptionError, VectorFormatError
from .formats import ADAPTER_CONFIG, RESIDUAL_STEM, VECTOR_STEM, VectorFolder, adapter_base
from .sources import TIED_PAIRS

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# randomized SVD: oversampling and power iterations (Halko, Martinsson & Tropp 2011); with these the
# truncation error stays within a fraction of a percent of the exact one on realistic spectra
N_ITER = 3
# A truncated SVD is the orthogonal projection of ΔW onto its kept singular vectors, so its error is
# ‖ΔW − B·A‖² = ‖ΔW‖² − Σ_{i≤r} σ_i², with no pass over ΔW. float32 rounding of the σ and of the vectors'
# orthogonality makes that difference uncertain by ~1e-6·‖ΔW‖², so it is used when the error is at least this
# fraction of ‖ΔW‖² (then known to ~1e-4 of itself); a smaller error is measured against ΔW.
CLOSED_FORM_MIN = 1e-2
_EMBED_NAMES = {emb for _, emb in TIED_PAIRS}
_HEAD_NAMES = {head for head, _ in TIED_PAIRS}


@dataclass(frozen=True)
class CompressResult:
    """What ``compress`` wrote, and its quality report."""

    out: str
    seconds: float
    report: CompressionReport

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "seconds": self.seconds, "report": self.report.model_dump(mode="json")}


@dataclass
class _Module:
    name: str  # vector tensor, ``<module>.weight``
    shape: tuple[int, int]
    embedding: bool  # nn.Embedding: PEFT stores lora_embedding_A/B and the delta is (B@A)ᵀ
    sq_norm: float = 0.0
    us: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # U·S, (rows, k), k ≥ the rank kept
    v: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # V, (cols, k)
    s: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # singular values, (k,)
    exact: bool = False
    rank: int = 0
    err_sq: float = 0.0  # ‖ΔW − B·A‖² with the stored factors
    err32_sq: float = 0.0  # the same with the float32 factors

    def report(self) -> ModuleReport:
        energy = min(1.0, self.kept_sq / self.sq_norm)
        return ModuleReport(name=self.name, shape=self.shape, rank=self.rank, energy=energy,
                            rel_error=math.sqrt(self.err_sq / self.sq_norm), params=self.rank * self.cost)

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def cost(self) -> int:
        return sum(self.shape)

    @property
    def kept_sq(self) -> float:
        """Σ_{i≤rank} σ_i²: the energy the module's factors keep."""
        return float((self.s[: self.rank].double() ** 2).sum())

    @property
    def work_bytes(self) -> int:
        """The float32 delta's size, the unit of the progress bars."""
        return 4 * math.prod(self.shape)


def _oversample(rank: int) -> int:
    return max(10, rank // 4)


def _svd(delta: torch.Tensor, q: int, exact: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The top ``q`` (or, exact, all) singular triplets of ``delta``: randomized unless exact or the matrix is
    small enough that randomization saves nothing."""
    if exact or 2 * q >= min(delta.shape):  # every triplet: the energy rule may need more than q
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u, s, vh.mT, True
    with torch.random.fork_rng(devices=[delta.device] if delta.is_cuda else []):  # same vector, same adapter
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=N_ITER)
    return u, s, v, False


def _rank_for_energy(s: torch.Tensor, sq_norm: float, energy: float) -> int | None:
    """The smallest r with Σ_{i≤r} σ_i² ≥ energy·‖ΔW‖² (float32 rounding forgiven), or None if q is short."""
    cum = torch.cumsum(s.double() ** 2, 0)
    hit = torch.nonzero(cum >= energy * sq_norm * (1 - 1e-6))
    return int(hit[0]) + 1 if hit.numel() else None


def compress(
    vector: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: int | None = None,
    exact: bool = False,
    embeddings: Literal["residual", "lora"] = "residual",
    dtype: str = "float32",
    device: str = "cpu",
    base_model: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CompressResult:
    """Write a PEFT LoRA adapter + residual for ``vector`` to ``out``, under one rank rule:
    ``rank`` (uniform), ``energy`` (per module, the smallest rank keeping that fraction of ‖ΔW‖²) or
    ``budget`` (a total LoRA parameter count, spent where it keeps the most energy)."""
    t0 = time.perf_counter()
    vector, out = Path(vector), Path(out)
    rule, rule_value = _check_rule(rank, energy, budget)
    if embeddings not in ("residual", "lora"):
        raise InvalidOptionError("--embeddings", embeddings, "use residual or lora")
    code = dtype_code(dtype)
    if code not in ("F32", "BF16", "F16"):
        raise InvalidOptionError("--dtype", dtype, "use float32, bfloat16 or float16")
    dev = resolve_device(device)
    check_output(out, overwrite, [vector])
    vec = VectorFolder(vector)
    card = vec.card
    if base_model is not None and re.match(HUB_ID_PATTERN, base_model):  # the recommended target, first
        bases = [base_model, *(b for b in card.recommended_bases if b != base_model)]
        card = card.model_copy(update={"recommended_bases": bases})
    if embeddings == "lora" and card.tie_word_embeddings:
        raise InvalidOptionError(
            "--embeddings", "lora",
            "the vector's models tie lm_head to the input embeddings, and PEFT applies a tied embedding LoRA "
            "either to the input side only (unmerged) or twice (merge_and_unload with ensure_weight_tying); "
            "keep the embeddings in the exact residual (the default)",
        )
    modules, residual = _split(card, embeddings == "lora")
    if not modules:
        raise VectorFormatError(str(vector), "no 2-D weight deltas to compress (all would stay in the residual)")

    out_dtype = ST_TO_TORCH[code]
    with decoding(str(vector), "a residual tensor"):
        residual_sq = sum(vec.sq_norm(name) for name in residual)
    cap = _spectrum_cap(modules, rule, rule_value)
    tensors: dict[str, torch.Tensor] = {}
    with progress_bar(sum(m.work_bytes for m in modules), "compress", progress, len(modules)) as bar:
        for i, m in enumerate(modules):
            check_stop()
            delta = _load(vec, m, dev)
            m.sq_norm = _sq(delta)
            _decompose(m, delta, rule, rule_value, cap(m), exact, seed=i)
            if rule != "budget" and m.sq_norm > 0:  # the rank is known: finish while the delta is here
                tensors.update(_finish(m, delta, out_dtype))
            tensor_done(bar, m.work_bytes)
            del delta
    modules = [m for m in modules if m.sq_norm > 0]  # a module whose delta is zero has nothing to carry
    if not modules:
        raise VectorFormatError(str(vector), "every 2-D weight delta is zero: there is nothing for LoRA to carry")
    if rule == "budget":  # ranks depend on every module's spectrum: read the deltas again
        # a module the allocation would grow past the singular values known so far gets twice as many
        # computed, and the allocation runs again; it ends using known values only, so its result is the
        # greedy on the full spectra
        rounds = 1
        while short := _allocate_budget(modules, int(rule_value)):
            rounds += 1
            size = sum(m.work_bytes for m in short)
            with progress_bar(size, f"compress, budget round {rounds}", progress, len(short)) as bar:
                for m in short:
                    check_stop()
                    _decompose(m, _load(vec, m, dev), rule, rule_value, 2 * m.s.numel(), exact,
                               seed=modules.index(m))
                    tensor_done(bar, m.work_bytes)
        for m in modules:
            check_stop()
            tensors.update(_finish(m, _load(vec, m, dev), out_dtype))
    sq_total = residual_sq + sum(m.sq_norm for m in modules)
    dropped_sq = sum(m.err_sq for m in modules)
    checks = _svd_checks(vec, modules, dev)

    with atomic_dir(out, overwrite) as tmp:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _chmod_like_umask(tmp / ADAPTER_WEIGHTS)  # safetensors writes 0600, whatever the umask
        _write_residual(vec, residual, tmp / f"{RESIDUAL_STEM}.safetensors")
        _lora_config(card, modules, base_model).save_pretrained(str(tmp))
        files = file_entries(tmp, (ADAPTER_CONFIG, ADAPTER_WEIGHTS, f"{RESIDUAL_STEM}.safetensors"))
        report = CompressionReport(
            svd="exact" if all(m.exact for m in modules) else "randomized",
            rule=rule,
            rule_value=rule_value,
            embeddings=embeddings,
            adapter_dtype=code,  # type: ignore[arg-type]
            residual_format="sparse" if vec.sparse else "dense",
            modules=[m.report() for m in modules],
            residual=residual,
            total_sq_norm=sq_total,
            adapter_energy=_frac(sum(m.kept_sq for m in modules), sq_total),
            residual_energy=_frac(residual_sq, sq_total),
            dropped_energy=_frac(dropped_sq, sq_total),
            rel_error=math.sqrt(_frac(dropped_sq, sq_total)),
            adapter_params=sum(m.rank * m.cost for m in modules),
            adapter_bytes=files[1].size,
            residual_bytes=files[2].size,
            vector_bytes=sum(f.size for f in card.files if f.path.startswith(VECTOR_STEM)),  # not eval.png
            svd_checks=checks,
        )
        kept = {m.name for m in modules} | set(residual)
        zero = sorted(e.name for e in card.tensors if e.name not in kept)
        VectorCard.model_validate({
            **card.model_dump(),
            "format": "lora",
            "exact": False,
            "tensors": [e.model_dump() for e in card.tensors if e.name in kept],
            "unchanged": sorted(card.unchanged + zero),
            "files": [f.model_dump() for f in files],
            "compression": report.model_dump(),
        }).write(tmp)
    return CompressResult(out=str(out), seconds=round(time.perf_counter() - t0, 3), report=report)


def _check_rule(rank: int | None, energy: float | None, budget: int | None) -> tuple[Any, float]:
    given = [(n, v) for n, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None]
    if len(given) != 1:
        raise InvalidOptionError("--rank/--energy/--budget", ", ".join(n for n, _ in given) or "none",
                                 "give exactly one rank rule")
    name, value = given[0]
    if name == "rank" and (int(value) != value or value < 1):
        raise InvalidOptionError("--rank", value, "must be an integer ≥ 1 (a rank-0 module carries nothing)")
    if name == "energy" and not 0 < value <= 1:
        raise InvalidOptionError("--energy", value, "must be in (0, 1]: the fraction of ‖ΔW‖² each module keeps")
    if name == "budget" and (int(value) != value or value < 1):
        raise InvalidOptionError("--budget", value, "must be a positive parameter count")
    return name, float(value)


def _split(card: VectorCard, lora_embeddings: bool) -> tuple[list[_Module], list[str]]:
    """LoRA modules (2-D ``*.weight`` deltas) and the tensors that stay exact in the residual."""
    modules: list[_Module] = []
    residual: list[str] = []
    for e in card.tensors:
        vocab = e.name in _EMBED_NAMES or e.name in _HEAD_NAMES
        if len(e.shape) == 2 and e.name.endswith(".weight") and min(e.shape) > 0 and (lora_embeddings or not vocab):
            modules.append(_Module(e.name, (e.shape[0], e.shape[1]), e.name in _EMBED_NAMES))
        else:
            residual.append(e.name)
    return modules, residual


def _spectrum_cap(modules: list[_Module], rule: str, value: float) -> Any:
    """How many singular triplets to compute per module."""
    if rule == "rank":
        return lambda m: min(int(value), min(m.shape))
    if rule == "energy":
        return lambda m: min(64, min(m.shape))  # a first guess, grown until the energy is reached
    # budget: the uniform rank it could buy; modules that deserve more get more computed later
    mean = value / sum(m.cost for m in modules)
    return lambda m: min(min(m.shape), max(1, int(mean)))


def _decompose(m: _Module, delta: torch.Tensor, rule: str, value: float, q: int, exact: bool, seed: int) -> None:
    if m.sq_norm == 0:
        return
    while True:
        u, s, v, was_exact = _svd(delta, min(q + _oversample(q), min(delta.shape)), exact, seed)
        if rule != "energy":
            m.rank = min(q, s.numel())
            break
        r = _rank_for_energy(s, m.sq_norm, value)
        if r is not None or was_exact:
            m.rank = r if r is not None else s.numel()
            break
        q *= 2
    m.rank = max(m.rank, 1)  # never rank 0: a nonzero matrix has a nonzero singular value
    if rule == "budget":  # kept, off the device, until every module's spectrum is known
        keep = s.numel() if was_exact else min(q, s.numel())  # randomized: the oversampled tail is rough
        m.us, m.v, m.s = (u[:, :keep] * s[:keep]).cpu(), v[:, :keep].cpu(), s[:keep].cpu()
    else:
        m.us, m.v, m.s = u[:, : m.rank] * s[: m.rank], v[:, : m.rank], s[: m.rank]
    m.exact = was_exact


def _allocate_budget(modules: list[_Module], budget: int) -> list[_Module]:
    """Rank 1 for every module, then the next singular value with the most energy per parameter, greedily.

    Past a module's known singular values its next one is bounded by the last known one; if the greedy
    takes such a bound, that module is returned, to have more computed (none returned: the allocation is
    final)."""
    floor = sum(m.cost for m in modules)
    if budget < floor:
        raise InvalidOptionError("--budget", budget, f"must be at least {floor:,}: one rank for each of the "
                                 f"{len(modules)} modules")
    left = budget - floor

    def gain(m: _Module) -> float | None:  # σ²/cost of the module's next rank, None if it has none
        if m.rank < m.s.numel():
            return float(m.s[m.rank]) ** 2 / m.cost
        return float(m.s[-1]) ** 2 / m.cost if m.s.numel() < min(m.shape) and not m.exact else None

    heap: list[tuple[float, int]] = []
    for i, m in enumerate(modules):
        m.rank = 1
        g = gain(m)
        if g is not None:
            heap.append((-g, i))
    heapq.heapify(heap)
    short: list[_Module] = []
    while heap:
        _, i = heapq.heappop(heap)
        m = modules[i]
        if m.cost > left:
            continue  # this module cannot grow any more; a cheaper one may still
        if m.rank >= m.s.numel():
            short.append(m)  # its next singular value is not known yet: stop growing it for now
            continue
        m.rank += 1
        left -= m.cost
        g = gain(m)
        if g is not None:
            heapq.heappush(heap, (-g, i))
    return short


def _load(vec: VectorFolder, m: _Module, dev: torch.device) -> torch.Tensor:
    """The module's delta as the matrix PEFT factors: ΔW, or ΔEᵀ for an embedding (PEFT holds B·A = ΔEᵀ)."""
    with decoding(str(vec.folder), m.name):
        delta = vec.dense(m.name)
    return (delta.mT if m.embedding else delta).to(dev)


def _finish(m: _Module, delta: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's PEFT tensors at its rank, and its error measured against its real delta (in float32, and
    as stored when the factors are rounded to a smaller dtype)."""
    r = m.rank
    us, v, s = m.us[:, :r].to(delta.device), m.v[:, :r].to(delta.device), m.s[:r].to(delta.device)
    root = s.sqrt()
    b = us / torch.where(root > 0, root, torch.ones_like(root))  # U·√S, from U·S
    a = (v * root).mT
    rest = m.sq_norm - m.kept_sq
    m.err32_sq = rest if rest >= CLOSED_FORM_MIN * m.sq_norm else _sq(delta - b @ a)
    b, a = b.to(dtype), a.to(dtype)
    m.err_sq = m.err32_sq
    if dtype != torch.float32:
        m.err_sq = _sq(delta - b.float() @ a.float())
    m.us = m.v = torch.empty(0)  # the factors live on in the returned tensors
    m.s = s.cpu()
    key = PEFT_PREFIX + m.module
    if m.embedding:
        return {f"{key}.lora_embedding_A": a.contiguous().cpu(), f"{key}.lora_embedding_B": b.contiguous().cpu()}
    return {f"{key}.lora_A.weight": a.contiguous().cpu(), f"{key}.lora_B.weight": b.contiguous().cpu()}


def _svd_checks(vec: VectorFolder, modules: list[_Module], dev: torch.device) -> list[SvdCheck]:
    """On the smallest randomized modules: the randomized truncation error against the exact one."""
    checks = []
    randomized = sorted((m for m in modules if not m.exact), key=lambda m: math.prod(m.shape))
    # the smallest and the largest: the largest matrices hold most of ‖v‖² and are the hardest case
    for m in {id(m): m for m in randomized[:1] + randomized[-1:]}.values():
        s = torch.linalg.svdvals(_load(vec, m, dev)).double()
        exact_err = float((s[m.rank :] ** 2).sum().sqrt())
        checks.append(SvdCheck(name=m.name, rank=m.rank, randomized_error=math.sqrt(m.err32_sq), exact_error=exact_err))
    return checks


def _write_residual(vec: VectorFolder, names: list[str], path: Path) -> None:
    """Copy the residual tensors' stored encoding (mask, values, fix-ups) as it is: exact stays exact."""
    keys = [k for n in names for k in vec.stored_keys(n)]
    raws = {k: vec.raw(k) for k in keys}
    plan = [TensorSpec(k, TORCH_TO_ST[t.dtype], tuple(t.shape)) for k, t in raws.items()]
    writer = SafetensorsFileWriter(path, {"format": "pt"}, plan)
    try:
        for spec in plan:
            writer.begin(spec)
            writer.write(raws[spec.name])
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _lora_config(card: VectorCard, modules: list[_Module], base_model: str | None) -> Any:
    """The adapter's ``peft.LoraConfig``: every module's scale lora_alpha/r is exactly 1."""
    from peft import LoraConfig

    ranks = {m.module: m.rank for m in modules}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(name): r for name, r in ranks.items() if r != common}
    return LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=_target_modules(card, set(ranks)),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model if base_model is not None else adapter_base(card),
    )


def _target_modules(card: VectorCard, chosen: set[str]) -> list[str]:
    """Leaf names (``q_proj``) where every module of that name in the model is in the adapter, full names
    otherwise: PEFT would give the others an empty LoRA, and drops adapter tensors outside the list."""
    all_modules = {n.removesuffix(".weight") for n in [*(e.name for e in card.tensors), *card.unchanged]
                   if n.endswith(".weight")}
    leaves: dict[str, set[str]] = {}
    for name in all_modules:
        leaves.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    out = []
    for leaf, names in sorted(leaves.items()):
        mine = names & chosen
        if mine == names:
            out.append(leaf)
        else:
            out.extend(sorted(mine))
    return out


def _chmod_like_umask(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def _sq(t: torch.Tensor) -> float:
    """‖t‖²: torch's pairwise float32 sum of squares (relative error ~1e-8 here, where a float32 vector_norm
    is off by ~1e-4 on large tensors, and a float64 copy costs more than the sum)."""
    return float(t.square().sum())


def _frac(part: float, total: float) -> float:
    return min(1.0, max(0.0, part / total)) if total > 0 else 0.0

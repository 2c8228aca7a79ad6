"""Benchmark `rvhub compress` against `mergekit-extract-lora` on a Qwen2.5-0.5B-shaped pair whose delta has a
realistic spectrum (a decaying low-rank part plus sparse changes plus dense noise, rounded to bf16).

    python scripts/bench_compress.py [--shapes 0.5b] [--rank R] [--reps 3] [--mergekit-reps 1] [--idle-wait 300]
                                     [--work .bench] [--out docs/BENCHMARKS.md] [--rvhub .venv/bin/rvhub] [--keep]

`--shapes tiny` is a fast self-test (rank 8 and one rep by default, about 40 s). Every timed step runs as its
own process from a warm page cache, after waiting for other processes to leave the CPU; the quality numbers are
computed afterwards, in this process, in float32 from the models and the adapters' files. The report goes
between this script's markers in --out and to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _bench_util import (
    REPO_ROOT,
    SHAPES,
    Measurement,
    QuietRuns,
    Shape,
    build_trio,
    git_state,
    machine_info,
    md_table,
    measure_quiet,
    package_version,
    quiet_note,
    remove,
    replace_section,
    safetensors_files,
    today,
    tree_size,
)

if TYPE_CHECKING:
    import torch

SECTION = "bench_compress"
PAIR_VERSION = 1  # bump when the planted delta changes, to invalidate the cached RL model and spectra
MERGEKIT_FLAGS = (
    "--no-cuda", "--device", "cpu", "--no-read-to-gpu", "--no-low-cpu-memory", "--no-multi-gpu",
    "--no-lazy-unpickle", "--no-async-write", "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
)
SPEED_TARGET, ERROR_TARGET = 10.0, 1.01
EMBED_DECAY = 0.7  # σ_i ∝ i^−0.7 for the embedding rows' low-rank part (kept out of DeltaRecipe: cached pairs)
TARGET_NOISE_STD = 0.002  # the extract/apply benchmark's TARGET = SFT + N(0, 0.002): a stand-in for "another model"
EXTRACT, COMPRESS, BOTH, BUDGET, MERGEKIT = (
    "rvhub extract", "rvhub compress --rank R", "rvhub extract + compress --rank R", "rvhub compress --budget N",
    "mergekit-extract-lora --max-rank R",
)
RV, RVB, MK, EXACT = "rvhub --rank", "rvhub --budget", "mergekit", "exact SVD"


@dataclass(frozen=True)
class DeltaRecipe:
    """How RL = bf16(SFT + Δ) is planted; Δ is built in float32, per tensor, from seeded streams."""

    rho: float = 2.5e-5  # element rms of a linear weight's low-rank part, before the module's amplitude factor
    components: int = 256  # K: singular components of the low-rank part (capped at min(rows, cols))
    decay: tuple[float, float] = (0.4, 1.0)  # σ_i ∝ i^−p, p uniform in this range, drawn per module
    amplitude: tuple[float, float] = (0.5, 2.0)  # per-module factor on every part, log-uniform in this range
    sparse_fraction: float = 0.005  # share of a linear weight's elements that also get a large change
    sparse_std: float = 6.0  # ... N(0, sparse_std·rho·amp)
    noise_std: float = 0.5  # dense noise N(0, noise_std·rho·amp) on every element of a linear weight
    embed_rows: float = 0.1  # share of embedding rows (tokens) that change
    embed_components: int = 64  # their delta: a rank-64 part of element rms rho plus the same dense noise
    norm_std: float = 1e-3  # RMSNorm weights (≈ 1): N(0, norm_std), so only a few elements move one bf16 ulp
    bias_std: float = 5e-5  # q/k/v biases (≈ N(0, 0.02)): N(0, bias_std)

    def describe(self) -> str:
        lo_p, hi_p = self.decay
        lo_a, hi_a = self.amplitude
        return (
            f"Δ = L + S + N per linear weight (q/k/v/o/gate/up/down) of shape m×n, in float32: L = U·diag(σ)·Vᵀ with"
            f" U, V random orthonormal (QR of Gaussians), K = min(m, n, {self.components}) components,"
            f" σ_i ∝ i^−p with p uniform in [{lo_p}, {hi_p}] per module, scaled so L's element rms is"
            f" {self.rho:g}·a; S = N(0, ({self.sparse_std:g}·{self.rho:g}·a)²) on a random {self.sparse_fraction:.1%}"
            f" of elements; N = N(0, ({self.noise_std:g}·{self.rho:g}·a)²) on every element; a is the module's"
            f" amplitude, log-uniform in [{lo_a}, {hi_a}]. Embeddings: a random {self.embed_rows:.0%} of token rows"
            f" get a rank-{self.embed_components} part (σ_i ∝ i^−{EMBED_DECAY}) of element rms {self.rho:g} plus"
            f" N(0, ({self.noise_std:g}·{self.rho:g})²) noise."
            f" RMSNorm weights: N(0, {self.norm_std:g}²); q/k/v biases: N(0, {self.bias_std:g}²)."
            " RL = bf16(float32(SFT) + Δ): the delta every tool sees is the bf16 difference RL − SFT."
        )


@dataclass(frozen=True)
class Pair:
    sft: Path
    rl: Path

    @property
    def root(self) -> Path:
        return self.rl.parent


# --------------------------------------------------------------------------- the pair


def _gen(seed: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed)


def _orthonormal(rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    import torch

    q, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    return q


def planted_delta(name: str, dims: tuple[int, ...], recipe: DeltaRecipe, seed: int) -> torch.Tensor:
    """The float32 Δ added to one SFT tensor (see DeltaRecipe)."""
    import torch

    g = _gen(seed)
    lo_a, hi_a = recipe.amplitude
    amp = math.exp(math.log(lo_a) + torch.rand((), generator=g).item() * math.log(hi_a / lo_a))
    p = recipe.decay[0] + torch.rand((), generator=g).item() * (recipe.decay[1] - recipe.decay[0])
    if len(dims) == 1:
        std = recipe.norm_std if name.endswith("norm.weight") else recipe.bias_std
        return torch.randn(dims, generator=g) * std
    rows, cols = dims
    if "embed_tokens" in name:
        picked = torch.randperm(rows, generator=g)[: max(1, int(rows * recipe.embed_rows))].sort().values
        part = _low_rank(len(picked), cols, recipe.embed_components, EMBED_DECAY, recipe.rho, g)
        part += torch.randn(part.shape, generator=g) * recipe.noise_std * recipe.rho
        delta = torch.zeros(dims)
        delta[picked] = part
        return delta
    rho = recipe.rho * amp
    delta = _low_rank(rows, cols, recipe.components, p, rho, g)
    n = rows * cols
    idx = torch.randperm(n, generator=g)[: int(n * recipe.sparse_fraction)]
    delta.view(-1)[idx] += torch.randn(idx.numel(), generator=g) * recipe.sparse_std * rho
    delta += torch.randn(dims, generator=g) * recipe.noise_std * rho
    return delta


def _low_rank(rows: int, cols: int, k: int, p: float, rms: float, g: torch.Generator) -> torch.Tensor:
    import torch

    k = min(rows, cols, k)
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** (-p)
    sigma *= rms * math.sqrt(rows * cols) / sigma.norm()  # ‖L‖_F = rms·√(mn)
    return (_orthonormal(rows, k, g) * sigma) @ _orthonormal(cols, k, g).T


def build_pair(shape: Shape, models_dir: Path, recipe: DeltaRecipe, seed: int = 0) -> Pair:
    """SFT = the cached synthetic SFT of `shape` (built by _bench_util.build_trio); RL = bf16(SFT + Δ).

    RL is written into models_dir/<shape>-compress/rl through a scratch folder renamed into place when complete.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    trio = build_trio(shape, models_dir, seed)
    final = models_dir / f"{shape.name}-compress"
    pair = Pair(trio.sft, final / "rl")
    stamp = final / "recipe.json"
    base_recipe = json.loads((models_dir / shape.name / "recipe.json").read_text())
    wanted = {"version": PAIR_VERSION, "seed": seed, "sft": base_recipe, "delta": asdict(recipe)}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(wanted)):
        return pair
    print(f"[{shape.name}] planting the RL delta ...", flush=True)
    scratch = models_dir / f"{shape.name}-compress.partial"
    remove(scratch)
    remove(final)
    (scratch / "rl").mkdir(parents=True)
    for side in ("config.json", "generation_config.json"):
        shutil.copy2(trio.sft / side, scratch / "rl" / side)
    rl = {}
    with safe_open(str(trio.sft / "model.safetensors"), framework="pt") as h:
        for i, (name, dims) in enumerate(shape.tensor_specs()):
            sft = h.get_tensor(name)
            out = (sft.float() + planted_delta(name, dims, recipe, seed * 1_000_003 + 7 * i + 5)).to(torch.bfloat16)
            if not torch.isfinite(out).all():
                raise RuntimeError(f"planting the delta made {name} non-finite")
            rl[name] = out
    save_file(rl, str(scratch / "rl" / "model.safetensors"), metadata={"format": "pt"})
    stamp_file = scratch / "recipe.json"
    stamp_file.write_text(json.dumps(wanted))
    scratch.rename(final)
    return pair


def lora_modules(shape: Shape) -> list[tuple[str, tuple[int, int]]]:
    """The 2-D linear weights (not the embeddings) that a default adapter replaces, with their shapes."""
    return [(n, (d[0], d[1])) for n, d in shape.tensor_specs() if len(d) == 2 and "embed_tokens" not in n]


# --------------------------------------------------------------------------- reading adapters


def _tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                yield key, h.get_tensor(key)


class Adapter:
    """A PEFT LoRA adapter folder: its factors, the scale PEFT would use per module, its other tensors."""

    def __init__(self, folder: Path):
        from peft.utils.other import get_pattern_key

        self.folder = folder
        self.config: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text())
        self.file = folder / "adapter_model.safetensors"
        self.tensors = dict(_tensors(self.file))
        self._pattern_key = get_pattern_key

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = f"base_model.model.{module}"
        a, b = self.tensors.get(f"{key}.lora_A.weight"), self.tensors.get(f"{key}.lora_B.weight")
        return None if a is None or b is None else (a.float(), b.float())

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """r and lora_alpha / r (or / √r with rsLoRA) exactly as PEFT 0.21 resolves them for this module."""
        c = self.config
        ranks, alphas = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
        r = ranks.get(self._pattern_key(list(ranks), module), c["r"])
        alpha = alphas.get(self._pattern_key(list(alphas), module), c["lora_alpha"])
        return r, alpha / (math.sqrt(r) if c.get("use_rslora") else r)

    def dtypes(self) -> str:
        return ", ".join(sorted({str(t.dtype).removeprefix("torch.") for k, t in self.tensors.items()
                                 if ".lora_A." in k or ".lora_B.weight" in k}))

    def targeted(self, module: str) -> bool:
        """Whether PEFT would put a LoRA layer on this module (target_modules as a list of names/suffixes)."""
        targets = self.config.get("target_modules") or []
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        return any(module == t or module.endswith("." + t) for t in targets)

    def other_keys(self) -> list[str]:
        return sorted(k for k in self.tensors if ".lora_A." not in k and ".lora_B.weight" not in k)


def decode_residual(path: Path) -> dict[str, torch.Tensor]:
    """Deltas of an rvhub vector/residual file in float64, decoded from docs/FORMAT.md independently of rvhub."""
    import numpy as np
    import torch

    raw = dict(_tensors(path))
    out = {}
    for name in sorted({k.split("::", 1)[0] for k in raw}):
        if name in raw:
            flat = raw[name].double().reshape(-1).clone()
        else:
            bits = np.unpackbits(raw[f"{name}::mask"].numpy(), bitorder="little").astype(bool)
            flat = torch.zeros(bits.size, dtype=torch.float64)
            flat[torch.from_numpy(np.flatnonzero(bits))] = raw[f"{name}::values"].double()
        fix = raw.get(f"{name}::fix_index")
        if fix is not None:
            lo = raw.get(f"{name}::fix_lo")  # only in vectors written before fix-ups held the exact difference
            flat[fix] = raw[f"{name}::fix_hi"].double() + (lo.double() if lo is not None else 0.0)
        out[name] = flat  # flat (a packed mask may be padded past numel): the caller trims and reshapes
    return out


# --------------------------------------------------------------------------- quality


@dataclass
class ModuleQuality:
    name: str
    shape: tuple[int, int]
    sq_norm: float  # ‖ΔW‖²
    sigma: list[float]  # all singular values, descending (exact)
    sq_err: dict[str, float] = field(default_factory=dict)  # per contender: ‖ΔW − s·B·A‖²
    rank: dict[str, int] = field(default_factory=dict)

    def exact_sq_err(self, r: int) -> float:
        return sum(s * s for s in self.sigma[r:])


@dataclass
class Quality:
    modules: list[ModuleQuality]
    other: dict[str, float]  # ‖Δ‖² of every non-LoRA tensor of the vector (embeddings, norms, biases)
    other_sq_err: dict[str, float]  # per contender: Σ error² over the non-LoRA tensors (as PEFT/rvhub apply it)
    changed: int
    numel: int
    notes: list[str]
    mk_other_target_sq: float  # mergekit's error on modules_to_save on a target = SFT + N(0, 0.002²)
    dtypes: dict[str, str]  # dtype of each contender's LoRA factors
    mk_bytes: dict[str, int]  # mergekit's tensor bytes: LoRA factors, absolute tensors, bias deltas

    @property
    def total_sq(self) -> float:
        return sum(m.sq_norm for m in self.modules) + sum(self.other.values())

    @property
    def lora_sq(self) -> float:
        return sum(m.sq_norm for m in self.modules)

    def lora_err(self, who: str) -> float:
        """‖Δ − Δ̂‖/‖Δ‖ over the LoRA modules."""
        if who == EXACT:
            return math.sqrt(sum(m.exact_sq_err(m.rank[RV]) for m in self.modules) / self.lora_sq)
        return math.sqrt(sum(m.sq_err[who] for m in self.modules) / self.lora_sq)

    def vector_err(self, who: str) -> float:
        """‖v − v̂‖/‖v‖ over the whole vector."""
        return math.sqrt((self.lora_err(who) ** 2 * self.lora_sq + self.other_sq_err.get(who, 0.0)) / self.total_sq)


def spectra(pair: Pair, modules: Sequence[tuple[str, tuple[int, int]]]) -> dict[str, list[float]]:
    """Exact singular values (torch.linalg.svdvals, float32) of every LoRA module's ΔW, cached beside RL."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cache = pair.root / "spectra.safetensors"
    if cache.is_file():
        return {k: v.tolist() for k, v in load_file(str(cache)).items()}
    out = {}
    with safe_open(str(pair.sft / "model.safetensors"), framework="pt") as a, \
            safe_open(str(pair.rl / "model.safetensors"), framework="pt") as b:
        for i, (name, _) in enumerate(modules):
            if i % 24 == 0:
                print(f"  exact spectra: {i}/{len(modules)}", flush=True)
            out[name] = torch.linalg.svdvals(b.get_tensor(name).float() - a.get_tensor(name).float())
    save_file(out, str(cache))
    return {k: v.tolist() for k, v in out.items()}


def evaluate(shape: Shape, pair: Pair, adapters: dict[str, Path], mergekit: Path | None) -> Quality:
    """Every contender's error per LoRA module and over the whole vector, from the files, in float32/64."""
    from safetensors import safe_open

    modules = lora_modules(shape)
    sigma = spectra(pair, modules)
    loaded = {who: Adapter(path) for who, path in adapters.items()}
    residuals = {who: decode_residual(path / "residual.safetensors") for who, path in adapters.items()
                 if (path / "residual.safetensors").is_file()}
    mk = Adapter(mergekit) if mergekit else None
    if mk:
        loaded[MK] = mk
    notes: list[str] = []
    rows: list[ModuleQuality] = []
    other: dict[str, float] = {}
    other_err: dict[str, float] = dict.fromkeys(loaded, 0.0)
    mk_other_target = 0.0
    changed = numel = 0
    module_names = {n for n, _ in modules}
    with safe_open(str(pair.sft / "model.safetensors"), framework="pt") as a, \
            safe_open(str(pair.rl / "model.safetensors"), framework="pt") as b:
        for name, dims in shape.tensor_specs():
            sft, rl = a.get_tensor(name), b.get_tensor(name)
            delta = rl.float() - sft.float()
            changed += int((delta != 0).sum())
            numel += delta.numel()
            if name in module_names:
                row = ModuleQuality(name, (dims[0], dims[1]), float(delta.double().square().sum()), sigma[name])
                module = name.removesuffix(".weight")
                for who, ad in loaded.items():
                    ab = ad.factors(module)
                    if ab is None:
                        notes.append(f"{who}: no LoRA factors for {module}")
                        row.sq_err[who], row.rank[who] = row.sq_norm, 0
                        continue
                    r, scale = ad.rank_and_scale(module)
                    if scale != 1.0:
                        notes.append(f"{who}: PEFT scale lora_alpha/r for {module} is {scale:g}, not 1")
                    if not ad.targeted(module):
                        notes.append(f"{who}: {module} has factors but is not in target_modules (PEFT drops it)")
                    if ab[0].shape[0] != r or ab[1].shape[1] != r:
                        notes.append(f"{who}: {module} has factors of rank {ab[0].shape[0]}, config says r={r}")
                    approx = (ab[1] @ ab[0]) * scale
                    row.sq_err[who] = float((delta - approx).double().square().sum())
                    row.rank[who] = ab[0].shape[0]
                rows.append(row)
                continue
            sq = float(delta.double().square().sum())
            other[name] = sq
            true = rl.double() - sft.double()
            for who in adapters:
                got = residuals.get(who, {}).get(name)
                if got is None:
                    other_err[who] += sq
                    if sq:
                        notes.append(f"{who}: the residual has no {name} (‖Δ‖² = {sq:.3g} dropped)")
                    continue
                other_err[who] += float((got[: true.numel()].reshape(true.shape) - true).square().sum())
            if mk:
                base = f"base_model.model.{name}"
                if base in mk.tensors:  # modules_to_save: RL's absolute value replaces the base's
                    other_err[MK] += float((mk.tensors[base].double() - rl.double()).square().sum())
                    mk_other_target += TARGET_NOISE_STD**2 * delta.numel()
                else:  # a bias delta as lora_B.bias: PEFT loads nothing for it (no lora_bias)
                    other_err[MK] += sq
    mk_bytes: dict[str, int] = {}
    for key, t in (mk.tensors.items() if mk else ()):
        kind = ("bias deltas" if key.endswith(".lora_B.bias") else "LoRA factors" if ".lora_" in key
                else "absolute tensors")
        mk_bytes[kind] = mk_bytes.get(kind, 0) + t.numel() * t.element_size()
    return Quality(rows, other, other_err, changed, numel, sorted(set(notes)), mk_other_target,
                   {who: ad.dtypes() for who, ad in loaded.items()}, mk_bytes)


def oracle_budget(q: Quality, budget: int) -> tuple[float, list[int]]:
    """Best LoRA-module error at a parameter budget from the exact spectra: every module at rank 1, then ranks
    added greedily by σ²/(rows + cols), energy per parameter (optimal here since spectra are non-increasing)."""
    import heapq

    ranks = [1] * len(q.modules)
    left = budget - sum(m.shape[0] + m.shape[1] for m in q.modules)
    heap = [(-m.sigma[1] ** 2 / sum(m.shape), i) for i, m in enumerate(q.modules) if len(m.sigma) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        m = q.modules[i]
        cost = sum(m.shape)
        if cost > left:
            continue
        left -= cost
        ranks[i] += 1
        if ranks[i] < len(m.sigma):
            heapq.heappush(heap, (-m.sigma[ranks[i]] ** 2 / cost, i))
    err = sum(m.exact_sq_err(r) for m, r in zip(q.modules, ranks, strict=True))
    return math.sqrt(err / q.lora_sq), ranks


# --------------------------------------------------------------------------- running the contenders


@dataclass
class Result:
    shape: Shape
    rank: int
    budget: int
    model_bytes: int
    idle_wait: float
    timings: dict[str, Measurement] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # rvhub.json "compression" per rvhub run
    json_out: dict[str, dict[str, Any]] = field(default_factory=dict)  # `--json` stdout per rvhub run
    sizes: dict[str, int] = field(default_factory=dict)
    quality: Quality | None = None
    mergekit_keys: list[str] = field(default_factory=list)
    mergekit_config: dict[str, Any] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # 1-minute load average before and after the timed steps
    reps: dict[str, QuietRuns] = field(default_factory=dict)


def rvhub_has_compress(rvhub: Path) -> bool:
    res = subprocess.run([str(rvhub), "compress", "--help"], capture_output=True, text=True)
    return res.returncode == 0


def _json_from_log(log: Path) -> dict[str, Any]:
    text = log.read_text(errors="replace")
    for i in (m.start() for m in re.finditer(r"(?m)^\{", text)):
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[i:])
            return obj if isinstance(obj, dict) else {}
        except ValueError:
            continue
    return {}


def run_shape(args: argparse.Namespace, shape: Shape, rvhub: Path | None, mergekit: Path) -> Result:
    work: Path = args.work
    rank = args.rank or (8 if shape.name == "tiny" else 64)
    pair = build_pair(shape, work / "models", DeltaRecipe())
    modules = lora_modules(shape)
    budget = sum(rank * (m + n) for _, (m, n) in modules)
    result = Result(shape, rank, budget, (pair.sft / "model.safetensors").stat().st_size, args.idle_wait)
    runs = work / "runs" / f"compress-{shape.name}"
    remove(runs)
    vec, ad, adb, mk = (runs / n for n in ("vector", "adapter_rank", "adapter_budget", "mergekit"))

    def step(row: str, cmd: Sequence[str | Path], reps: int, inputs: Sequence[Path], out: Path) -> None:
        print(f"[{shape.name}] {row} (x{reps}) ...", flush=True)
        log = work / "logs" / f"compress-{shape.name}-{re.sub(r'[^a-z]+', '_', row.lower()).strip('_')}.log"
        runs = measure_quiet([str(c) for c in cmd], log, reps, inputs, [out], args.idle_wait, f"[{shape.name}]")
        result.reps[row] = runs
        result.timings[row] = m = runs.measurement
        print(f"[{shape.name}] {row}: {m.wall_s:.2f} s, {m.peak_rss_mb:,.0f} MB", flush=True)
        if rvhub and cmd[0] == rvhub and cmd[1] == "compress":
            result.json_out[row] = _json_from_log(log)
            card = json.loads((out / "rvhub.json").read_text())
            result.reports[row] = card.get("compression") or {}

    adapters: dict[str, Path] = {}
    result.load.append(os.getloadavg()[0])
    if rvhub:
        step(EXTRACT, [rvhub, "extract", "--from", pair.sft, "--to", pair.rl, "-o", vec, "--quiet", "--json"],
             args.reps, [pair.sft, pair.rl], vec)
        result.sizes["vector"] = sum(f.stat().st_size for f in safetensors_files(vec))
        if rvhub_has_compress(rvhub):
            step(COMPRESS, [rvhub, "compress", vec, "-o", ad, "--rank", rank, "--quiet", "--json"],
                 args.reps, [vec], ad)
            result.timings[BOTH] = Measurement.combine([result.timings[EXTRACT], result.timings[COMPRESS]])
            step(BUDGET, [rvhub, "compress", vec, "-o", adb, "--budget", budget, "--quiet", "--json"],
                 args.reps, [vec], adb)
            adapters = {RV: ad, RVB: adb}
            for who, path in adapters.items():
                result.sizes[f"{who} adapter"] = (path / "adapter_model.safetensors").stat().st_size
                res = path / "residual.safetensors"
                result.sizes[f"{who} residual"] = res.stat().st_size if res.is_file() else 0
                result.sizes[f"{who} folder"] = tree_size(path)
        else:
            print(f"[{shape.name}] `rvhub compress` is not available: its rows are skipped", flush=True)
    step(MERGEKIT, [mergekit, "--model", pair.rl, "--base-model", pair.sft, "--out-path", mk, "--max-rank", rank,
                    *MERGEKIT_FLAGS], args.mergekit_reps, [pair.sft, pair.rl], mk)
    result.sizes[f"{MK} adapter"] = (mk / "adapter_model.safetensors").stat().st_size
    result.sizes[f"{MK} folder"] = tree_size(mk)
    result.load.append(os.getloadavg()[0])
    print(f"[{shape.name}] computing errors in float32 (not timed) ...", flush=True)
    result.quality = evaluate(shape, pair, adapters, mk)
    mk_adapter = Adapter(mk)
    result.mergekit_config = mk_adapter.config
    result.mergekit_keys = mk_adapter.other_keys()
    if not args.keep:
        remove(runs)
    return result


# --------------------------------------------------------------------------- checks of rvhub's own report


def report_checks(r: Result) -> list[str]:
    """Compare what rvhub says about an adapter (rvhub.json, --json) with what this script computed."""
    q = r.quality
    lines: list[str] = []
    if q is None:
        return lines
    for row, who in ((COMPRESS, RV), (BUDGET, RVB)):
        rep = r.reports.get(row)
        if not rep:
            continue
        by_name = {m["name"]: m for m in rep.get("modules", [])}
        d_err = d_energy = 0.0
        rank_mismatch, missing = [], []
        for m in q.modules:
            entry = by_name.get(m.name) or by_name.get(m.name.removesuffix(".weight"))
            if entry is None:
                missing.append(m.name)
                continue
            mine = math.sqrt(m.sq_err[who] / m.sq_norm) if m.sq_norm else 0.0
            d_err = max(d_err, abs(entry["rel_error"] - mine))
            d_energy = max(d_energy, abs(entry["energy"] - (1 - mine**2)))
            if entry["rank"] != m.rank[who]:
                rank_mismatch.append(f"{m.name}: report {entry['rank']}, file {m.rank[who]}")
        tot_rel = abs(rep["total_sq_norm"] - q.total_sq) / q.total_sq
        parts = [f"`{row}`: per-module rel_error max |report − computed| {d_err:.1e}, energy {d_energy:.1e};",
                 f"total_sq_norm off by {tot_rel:.1e} (relative); rel_error {rep['rel_error']:.5f} vs computed"
                 f" {q.vector_err(who):.5f};"]
        energy_sum = rep["adapter_energy"] + rep["residual_energy"] + rep["dropped_energy"]
        parts.append(f"adapter+residual+dropped energy = {energy_sum:.6f};")
        for key, size in (("adapter_bytes", f"{who} adapter"), ("residual_bytes", f"{who} residual"),
                          ("vector_bytes", "vector")):
            if rep.get(key) != r.sizes.get(size):
                parts.append(f"{key} {rep.get(key)} ≠ file size {r.sizes.get(size)};")
        params = sum(m.rank[who] * sum(m.shape) for m in q.modules)
        if rep.get("adapter_params") != params:
            parts.append(f"adapter_params {rep.get('adapter_params')} ≠ Σ r·(m+n) = {params};")
        if rank_mismatch:
            parts.append(f"{len(rank_mismatch)} rank(s) differ from the file, e.g. {rank_mismatch[0]};")
        if missing:
            parts.append(f"{len(missing)} module(s) missing from the report, e.g. {missing[0]};")
        checks = rep.get("svd_checks") or []
        if checks:
            worst = max(c["randomized_error"] / c["exact_error"] for c in checks if c["exact_error"] > 0)
            parts.append(f"svd_checks: {len(checks)}, worst randomized/exact {worst:.4f};")
        out = r.json_out.get(row, {})
        if out.get("report") is not None:
            parts.append("`--json` report " + ("=" if out["report"] == rep else "≠") + " rvhub.json's compression;")
        scales = {m.name for m in q.modules}
        parts.append(f"PEFT scale 1 and target_modules cover all {len(scales)} modules: "
                     + ("no (see notes)" if any(n.startswith(f"{who}:") for n in q.notes) else "yes") + ";")
        lines.append(" ".join(parts).rstrip(";"))
    return lines


# --------------------------------------------------------------------------- report


def _f(x: float | None, fmt: str = "{:.4f}") -> str:
    return "—" if x is None else fmt.format(x)


def verdict(ok: bool | None, text: str) -> str:
    return "n/a" if ok is None else f"{'PASS' if ok else 'MISS'} ({text})"


def render(results: Sequence[Result], args: argparse.Namespace, command: str, rvhub_note: str,
           mergekit: Path, source: str) -> str:
    m = machine_info()
    mk_python = mergekit.parent / "python"
    mk_versions = ", ".join(f"{p} {package_version(p, mk_python)}" for p in ("mergekit", "torch", "safetensors"))
    here = ", ".join(f"{p} {package_version(p)}" for p in ("torch", "safetensors", "peft", "numpy"))
    recipe = DeltaRecipe()
    parts = [
        "## rvhub compress vs mergekit-extract-lora",
        "",
        f"- Command: `{command}`",
        f"- Date: {today()}; source at the start of the run: {source}",
        f"- Machine: {m['cores']} cores, {m['ram']} RAM, {m['cpu']} ({m['os']}, Python {m['python']})",
        f"- Benchmark interpreter: {here}",
        f"- rvhub: {rvhub_note}",
        f"- mergekit: {mk_versions}, its own venv; command `mergekit-extract-lora --model RL --base-model SFT"
        f" --out-path OUT --max-rank R {' '.join(MERGEKIT_FLAGS)}` (env CUDA_VISIBLE_DEVICES='', HF_HUB_OFFLINE=1)",
        "- rvhub commands: `rvhub extract --from SFT --to RL -o VEC`, then `rvhub compress VEC -o OUT --rank R` and"
        " `rvhub compress VEC -o OUT --budget N` (all with `--quiet --json`, default SVD, dtype and embeddings)",
        "",
        "**The pair.** SFT is the extract/apply benchmark's synthetic bf16 checkpoint (N(0, 0.02) weights, norms"
        " ≈ 1, tied embeddings). " + recipe.describe(),
        "",
        "**Measurement.** Each timed step is a separate process started from a warm page cache; wall time includes"
        " interpreter start-up and imports; peak RSS is the child's `ru_maxrss`. Wall time is the median over the"
        " reps, RSS the max. Errors are computed afterwards by this script: ΔW = float32(RL) − float32(SFT) from"
        " the model files; the reference is the exact truncation error √(Σ_{i>r} σ_i²) from"
        " `torch.linalg.svdvals` (the exact SVD's singular values); each adapter's error is ‖ΔW − s·B·A‖_F with"
        " B, A read from its adapter_model.safetensors and s = lora_alpha/r as PEFT 0.21 resolves it"
        " (rank_pattern/alpha_pattern). Totals: √(Σ error²/Σ‖ΔW‖²) over the LoRA modules, and over the whole"
        " vector with embeddings, norms and biases counted as each tool's output carries them into a model loaded"
        " with PEFT (rvhub's residual is decoded from its file and compared with the true delta).",
    ]
    for r in results:
        parts += ["", *render_shape(r)]
    if any(r.shape.name == "tiny" for r in results):
        parts += ["", "_Tiny self-test shape: timings are dominated by start-up and mean nothing._"]
    return "\n".join(parts) + "\n"


def step_label(row: str, r: Result) -> str:
    return row.replace(" R", f" {r.rank}").replace(" N", f" {r.budget:,}")


def render_shape(r: Result) -> list[str]:
    q = r.quality
    assert q is not None
    name = "tiny self-test shape" if r.shape.name == "tiny" else f"Qwen2.5-{r.shape.name.upper()} shape"
    have_rv = RV in (q.modules[0].sq_err if q.modules else {})
    lines = [f"### {name}: R = {r.rank}, N = {r.budget:,} (= Σ R·(rows + cols) over the {len(q.modules)} LoRA"
             " modules)", ""]
    lines.append(f"- Delta: {q.changed:,} of {q.numel:,} elements changed in bf16 ({q.changed / q.numel:.1%});"
                 f" ‖v‖² = {q.total_sq:.4g}, of which {q.lora_sq / q.total_sq:.2%} in the LoRA modules;"
                 f" exact rank-{r.rank} truncation keeps"
                 f" {1 - sum(m.exact_sq_err(r.rank) for m in q.modules) / q.lora_sq:.1%} of the LoRA modules' energy.")
    base = r.timings.get(MERGEKIT)
    rows = []
    for row in (EXTRACT, COMPRESS, BOTH, BUDGET, MERGEKIT):
        t = r.timings.get(row)
        label = row.replace(" R", f" {r.rank}").replace(" N", f" {r.budget:,}")
        if t is None:
            rows.append([label, "—", "—", "—", "—", "—"])
            continue
        ratio = f"{base.wall_s / t.wall_s:.2f}×" if base else "—"
        reps = r.reps[row].reps if row in r.reps else []
        walls = ", ".join(f"{w:.1f}" for w, _, _, _ in reps) or "sum of the two rows above"
        rss = ", ".join(f"{m:,.0f}" for _, m, _, _ in reps) or "max of the two"
        other = ", ".join(f"{o:.2f}" for _, _, o, _ in reps) or "—"
        rows.append([label, f"{t.wall_s:.2f}", walls, f"{t.peak_rss_mb:,.0f}", rss, ratio, other])
    lines += ["", md_table(["step", "wall s (median)", "each rep", "peak RSS MB (max)", "each rep",
                            "mergekit wall / this", "other processes, cores"], rows), ""]
    own = [f"`{row.replace(' R', f' {r.rank}').replace(' N', f' {r.budget:,}')}` {out['seconds']:.2f} s"
           for row, out in r.json_out.items() if isinstance(out.get("seconds"), (int, float))]
    if own:
        lines.append("- In-process time reported by rvhub's `--json` `seconds` (last rep; the wall time above adds"
                     " interpreter start-up and imports): " + ", ".join(own) + ".")
    if r.load:
        labelled = {f"`{step_label(row, r)}`": q for row, q in r.reps.items()}
        lines.append("- " + quiet_note(labelled, r.idle_wait)
                     + f". 1-minute load average before / after the timed steps: {r.load[0]:.2f} / {r.load[-1]:.2f}.")
    lines.append("")

    who_cols = ([RV, RVB] if have_rv else []) + [MK]
    head = ["", f"exact SVD, rank {r.rank}"] + [f"rvhub --rank {r.rank}", f"rvhub --budget {r.budget:,}"][
        : 2 if have_rv else 0] + [f"mergekit --max-rank {r.rank}"]
    exact_lora = math.sqrt(sum(m.exact_sq_err(r.rank) for m in q.modules) / q.lora_sq)
    params = {who: sum(m.rank[who] * sum(m.shape) for m in q.modules) for who in who_cols}

    def ranks(who: str) -> str:
        rs = [m.rank[who] for m in q.modules]
        return f"{min(rs)} / {statistics.median(rs):g} / {max(rs)}"

    qrows = [
        ["LoRA parameters", f"{r.budget:,}"] + [f"{params[w]:,}" for w in who_cols],
        ["rank min / median / max", f"{r.rank} / {r.rank} / {r.rank}"] + [ranks(w) for w in who_cols],
        ["rel. error, LoRA modules", _f(exact_lora)] + [_f(q.lora_err(w)) for w in who_cols],
        ["… ÷ exact SVD at rank R", "1.0000"] + [_f(q.lora_err(w) / exact_lora) for w in who_cols],
        ["… ÷ exact SVD at its own ranks", "1.0000"] + [
            _f(q.lora_err(w) / math.sqrt(sum(m.exact_sq_err(m.rank[w]) for m in q.modules) / q.lora_sq))
            for w in who_cols],
        ["worst module ÷ exact at its rank", "1.0000"] + [
            _f(max(math.sqrt(m.sq_err[w] / m.exact_sq_err(m.rank[w])) for m in q.modules
                   if m.exact_sq_err(m.rank[w]) > 0)) for w in who_cols],
        ["rel. error, whole vector (PEFT on SFT)", _f(math.sqrt((exact_lora**2 * q.lora_sq) / q.total_sq))]
        + [_f(q.vector_err(w)) for w in who_cols],
        ["LoRA factor dtype", "float32"] + [q.dtypes.get(w, "—") for w in who_cols],
        ["adapter_model.safetensors MB", "—"] + [_f(r.sizes[f"{w} adapter"] / 1e6, "{:,.1f}") for w in who_cols],
        ["residual.safetensors MB", "—"] + [_f(r.sizes.get(f"{w} residual", 0) / 1e6, "{:,.1f}") for w in who_cols],
    ]
    lines += [md_table(head, qrows), ""]
    oracle, oracle_ranks = oracle_budget(q, r.budget)
    lines.append(f"- Oracle for the budget (exact spectra, ranks added greedily by σ²/(rows + cols)): LoRA-module"
                 f" error {oracle:.4f}, ranks {min(oracle_ranks)} / {statistics.median(oracle_ranks):g} /"
                 f" {max(oracle_ranks)}.")
    by_type: dict[str, list[ModuleQuality]] = {}
    for m in q.modules:
        by_type.setdefault(m.name.split(".")[-2], []).append(m)
    trows = []
    for kind, ms in by_type.items():
        sq = sum(m.sq_norm for m in ms)
        trows.append([kind, f"{ms[0].shape[0]}×{ms[0].shape[1]}", f"{sq / q.total_sq:.3f}",
                      _f(math.sqrt(sum(m.exact_sq_err(r.rank) for m in ms) / sq))]
                     + [_f(math.sqrt(sum(m.sq_err[w] for m in ms) / sq)) for w in who_cols]
                     + ([f"{statistics.median(m.rank[RVB] for m in ms):g}"] if have_rv else []))
    lines += ["", md_table(["module", "shape", "share of ‖v‖²", f"exact r={r.rank}"]
                           + [{RV: "rvhub --rank", RVB: "rvhub --budget", MK: "mergekit"}[w] for w in who_cols]
                           + (["median budget rank"] if have_rv else []), trows), ""]
    mb = r.model_bytes
    lines.append(f"- Sizes: bf16 model {mb / 1e6:,.1f} MB; sparse vector {r.sizes.get('vector', 0) / 1e6:,.1f} MB; "
                 + "; ".join(f"{w} folder {r.sizes[f'{w} folder'] / 1e6:,.1f} MB" for w in who_cols) + ".")
    lines += mergekit_lines(r)
    lines += [f"- rvhub report vs this script: {line}" for line in report_checks(r)]
    lines += [f"- Note: {n}" for n in q.notes[:12]]
    if len(q.notes) > 12:
        lines.append(f"- … and {len(q.notes) - 12} more notes")
    lines += ["", "#### Targets", "", md_table(["target", "result"], target_rows(r, exact_lora))]
    return lines


def mergekit_lines(r: Result) -> list[str]:
    q = r.quality
    assert q is not None
    c = r.mergekit_config
    saved = [k for k in r.mergekit_keys if not k.endswith(".lora_B.bias")]
    biases = [k for k in r.mergekit_keys if k.endswith(".lora_B.bias")]
    other_sq = sum(q.other.values())
    return [
        f"- mergekit's adapter: r = {c.get('r')}, lora_alpha = {c.get('lora_alpha')} (scale 1),"
        f" modules_to_save = {c.get('modules_to_save')}; besides the LoRA factors it holds {len(saved)} absolute"
        f" tensors ({', '.join(sorted({k.split('.')[-2] for k in saved}))}) and {len(biases)} bias deltas as"
        " `lora_B.bias` (ignored by PEFT without `lora_bias`, so they count as lost above). Its"
        " adapter_model.safetensors: " + ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in sorted(q.mk_bytes.items()))
        + ".",
        f"- On SFT itself the absolute tensors are exact (they are RL's values). On any other target they"
        f" overwrite the target's own weights: with a target = SFT + N(0, {TARGET_NOISE_STD}²) their error"
        f" would be ≈ {math.sqrt(q.mk_other_target_sq):.3g} in norm,"
        f" {math.sqrt(q.mk_other_target_sq / q.total_sq):.1f}× ‖v‖"
        f" (the non-LoRA part of v has norm {math.sqrt(other_sq):.3g}).",
    ]


def target_rows(r: Result, exact_lora: float) -> list[list[str]]:
    q = r.quality
    assert q is not None
    mk = r.timings.get(MERGEKIT)
    rows = []
    for row in (COMPRESS, BOTH):
        t = r.timings.get(row)
        ratio = mk.wall_s / t.wall_s if mk and t else None
        label = f"{row.replace(' R', f' {r.rank}')} ≥ {SPEED_TARGET:g}× faster than mergekit-extract-lora"
        rows.append([label, verdict(None if ratio is None else ratio >= SPEED_TARGET, f"{_f(ratio, '{:.1f}')}×")])
    have_rv = bool(q.modules) and RV in q.modules[0].sq_err
    ratio = q.lora_err(RV) / exact_lora if have_rv else None
    rows.append([f"rvhub --rank {r.rank} total error within 1% of the exact truncated SVD",
                 verdict(None if ratio is None else ratio <= ERROR_TARGET, f"ratio {_f(ratio)}")])
    if have_rv:
        b, u = q.lora_err(RVB), q.lora_err(RV)
        pb = sum(m.rank[RVB] * sum(m.shape) for m in q.modules)
        ok = b < u and pb <= r.budget
        rows.append([f"--budget {r.budget:,} error < --rank {r.rank} error at equal parameter count",
                     verdict(ok, f"{b:.4f} vs {u:.4f}, {pb:,} params")])
    else:
        rows.append(["--budget error < uniform error at equal parameter count", "n/a"])
    return rows


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--shapes", default="0.5b", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--rank", type=int, default=None, help="R (default 64; 8 for the tiny shape)")
    p.add_argument("--reps", type=int, default=None, help="runs per rvhub step (median wall time, max RSS;"
                   " default 3, 1 for the tiny shape)")
    p.add_argument("--mergekit-reps", type=int, default=1, help="runs of mergekit-extract-lora")
    p.add_argument("--work", type=Path, default=REPO_ROOT / ".bench", help="models, venv, scratch outputs")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "BENCHMARKS.md", help="Markdown report")
    p.add_argument("--rvhub", type=Path, default=REPO_ROOT / ".venv" / "bin" / "rvhub", help="rvhub CLI")
    p.add_argument("--keep", action="store_true", help="keep the vector and adapters under WORK/runs")
    p.add_argument("--idle-wait", type=float, default=300.0,
                   help="seconds to wait, before each timed run, for other processes to leave the CPU (0: no wait)")
    args = p.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if args.reps is None:
        args.reps = 1 if args.shapes == "tiny" else 3
    if unknown or args.reps < 1 or args.mergekit_reps < 1 or (args.rank is not None and args.rank < 1):
        p.error(f"unknown shapes {unknown}" if unknown else "--reps, --mergekit-reps and --rank must be ≥ 1")
    args.work = args.work.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    source = git_state()
    rvhub = args.rvhub.resolve() if args.rvhub.exists() else None
    if rvhub:
        rvhub_note = f"{package_version('rvhub', rvhub.parent / 'python')} ({rvhub})"
        code = REPO_ROOT / "rvhub" / "compress.py"
        if code.is_file():
            rvhub_note += f", rvhub/compress.py sha256 {hashlib.sha256(code.read_bytes()).hexdigest()[:12]}"
        if not rvhub_has_compress(rvhub):
            rvhub_note += "; `rvhub compress` not available: its rows are skipped"
    else:
        rvhub_note = f"not found at {args.rvhub}: rvhub rows skipped"
    mergekit = args.work / "mergekit-venv" / "bin" / "mergekit-extract-lora"
    if not mergekit.exists():
        sys.exit(f"{mergekit} not found: run scripts/bench_extract_apply.py once to install mergekit")
    results = [run_shape(args, SHAPES[name], rvhub, mergekit) for name in args.shapes.split(",")]
    command = shlex.join(["python", "scripts/bench_compress.py", *(argv or sys.argv[1:])])
    report = render(results, args, command, rvhub_note, mergekit, source)
    print("\n" + report)
    replace_section(args.out, SECTION, report)
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()

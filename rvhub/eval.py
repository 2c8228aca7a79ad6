"""``rvhub eval``: benchmark deltas of a vector on a target, measured in memory with lm-evaluation-harness.

One model load. Runs: the target alone, target + α·v, target − α·v, target + α·r (r a seeded control with
v's per-tensor L2 norm), and + α·v over a sweep of α. Each run adds its delta in place (rvhub.inmemory: the
weights ``rvhub apply`` would write, bit for bit), computed straight from the target's files so that no run
pays a separate restore (rvhub.inmemory.switch_to), and runs lm-eval once per task on an ``HFLM`` wrapping the
loaded model (each task built once; each run from the random states a fresh ``simple_evaluate`` would have).
Per-example results give paired tests (rvhub._stats) of +α·v against the target and against the control.
The deltas go into the card (rvhub.json + README.md), the sweep's plot beside it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .card import BenchmarkDelta, HarnessSettings, PairedTest, Scores, SweepPoint, VectorCard
from .errors import InvalidOptionError, MissingExtraError, VectorFormatError

logger = logging.getLogger(__name__)

PLOT_FILE = "eval.png"
CONTROLS = ("gaussian", "permute", "none")
Role = Literal["target", "plus", "minus", "control", "sweep"]


@dataclass(frozen=True)
class Run:
    """One evaluated model: the target, or the target plus ``scale`` times v or the control."""

    role: Role
    scale: float

    @property
    def label(self) -> str:
        sign = {"target": "target", "plus": "+v", "minus": "-v", "control": "+r", "sweep": "+v"}[self.role]
        return sign if self.role == "target" else f"{sign} α={abs(self.scale):g}"


@dataclass
class TaskResult:
    """What lm-eval returned for one task in one run."""

    scores: dict[str, float]  # "metric,filter" -> score
    stderr: dict[str, float | None]
    n: int | None
    per_sample: dict[str, dict[int, float]]  # "metric,filter" -> doc_id -> value
    version: str | None
    task_hash: str | None
    num_fewshot: int | None
    higher_is_better: dict[str, bool]


@dataclass(frozen=True)
class EvalReport:
    """What ``rvhub eval`` measured, and where it wrote it."""

    vector: str
    target: str
    tasks: list[str]
    scale: float
    scales: list[float]
    control: str
    control_seed: int
    runs: list[dict[str, Any]]  # {"run", "role", "scale", "task", "metric", "score", "stderr", "n"}
    deltas: list[dict[str, Any]]  # BenchmarkDelta dumps
    best_scales: dict[str, float]  # "task metric" -> α
    card_written: bool
    plot: str | None
    output_dir: str | None
    seconds: float
    harness_version: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise MissingExtraError("rvhub eval", "eval", "lm-evaluation-harness (lm_eval)") from e
    return lm_eval


def parse_scales(text: str | Sequence[float] | None) -> list[float]:
    """``0.25,0.5,1`` → [0.25, 0.5, 1.0]; refuses non-finite or unparsable values."""
    if text is None:
        return []
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for p in parts:
        try:
            x = float(p)
        except ValueError as e:
            raise InvalidOptionError("--scales", text, "comma-separated finite numbers, e.g. 0.25,0.5,1") from e
        if not math.isfinite(x):
            raise InvalidOptionError("--scales", text, "every α must be a finite number")
        out.append(x)
    if not out:
        raise InvalidOptionError("--scales", text, "comma-separated finite numbers, e.g. 0.25,0.5,1")
    return sorted(set(out))


def resolve_vector(vector: str | Path, registry: Any = None, progress: bool = True) -> tuple[Path, bool]:
    """(folder, is the user's own folder): a local vector or adapter folder, else a registry repo id pulled
    and verified first (its cached copy is not the user's: the card is then not rewritten)."""
    path = Path(vector)
    if path.exists():
        return path, True
    from .registry import VectorRef, pull

    try:
        VectorRef.parse(str(vector))
    except Exception as e:
        raise VectorFormatError(str(vector), "no such folder, and not a registry repo id (org/name[@rev])") from e
    pulled = pull(str(vector), registry=registry, progress=progress)
    return Path(pulled.path), False


def evaluate_vector(
    vector: str | Path,
    base: str,
    tasks: Sequence[str],
    *,
    scale: float | None = None,
    scales: str | Sequence[float] | None = None,
    control: str = "gaussian",
    control_seed: int = 0,
    minus: bool = True,
    include_path: str | Path | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    batch_size: int | str = 1,
    gen_kwargs: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    force: bool = False,
    allow_vocab_mismatch: bool = False,
    registry: Any = None,
    output_dir: str | Path | None = None,
    write_card: bool = True,
    progress: bool = True,
) -> EvalReport:
    """Evaluate ``tasks`` on the target alone, +α·v, −α·v and +α·r (and +α·v over ``scales``), in memory.

    α defaults to the card's recommended scale. The deltas (with paired tests, the sweep and everything that
    makes them comparable) replace the card's deltas with the same key; the card is written only after every
    run finished, so an interrupted eval leaves it as it was. A registry vector's card is not rewritten.
    """
    t0 = time.perf_counter()
    from .apply import resolve_device

    if control not in CONTROLS:
        raise InvalidOptionError("--control", control, f"one of {', '.join(CONTROLS)}")
    sweep = parse_scales(scales)
    if scale is not None and not math.isfinite(scale):
        raise InvalidOptionError("--scale", scale, "must be a finite number")
    task_list = [t.strip() for t in tasks if t.strip()]
    if not task_list:
        raise InvalidOptionError("--tasks", ",".join(tasks), "at least one task name")
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise InvalidOptionError("--limit", limit, "a positive number of examples (or a fraction below 1)")
    dev = resolve_device(device)
    lm_eval = _import_lm_eval()
    from ._io import dtype_code

    if dtype is not None:
        dtype_code(dtype)

    folder, own = resolve_vector(vector, registry, progress)
    from .formats import open_vector

    vec = open_vector(folder)
    card = vec.card
    alpha = card.recommended_scale if scale is None else scale
    if not vec.entries and (minus or control != "none"):
        what = "the minus run" if minus else f"a {control} control"
        raise InvalidOptionError("--no-minus/--control", "default", f"{what} needs a vector with tensors; this one "
                                 "has none: pass --no-minus and --control none")
    task_manager = _task_manager(lm_eval, include_path, task_list)

    from .apply import plan_apply
    from .compat import check_model, require_compatible
    from .sources import open_model

    tgt = open_model(base, hash_content=False)
    plan_apply(vec, tgt, None, allow_vocab_mismatch)  # refuses what cannot be applied at all
    if not force:
        require_compatible(check_model(card, tgt, str(folder), allow_vocab_mismatch=allow_vocab_mismatch))

    runs = [Run("target", 0.0), Run("plus", alpha)]
    if minus:
        runs.append(Run("minus", -alpha))
    if control != "none":
        runs.append(Run("control", alpha))
    runs += [Run("sweep", a) for a in sweep if a != alpha]

    from ._runner import Runner

    runner = Runner(
        lm_eval, vec, tgt, dev, dtype, task_manager, control, control_seed, allow_vocab_mismatch,
        dict(limit=limit, num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, batch_size=batch_size,
             gen_kwargs=gen_kwargs, seed=seed),
        Path(output_dir) if output_dir is not None else None,
    )
    results = runner.run_all(runs, task_list, progress)

    settings = dict(limit=limit, seed=seed, gen_kwargs=gen_kwargs, dtype=runner.dtype_name,
                    chat_template=apply_chat_template, version=runner.harness_version)
    deltas = build_deltas(results, runs, task_list, alpha, sweep, control, control_seed, tgt.ref.id, settings, seed)
    plot_bytes = _plot(deltas, alpha) if sweep else None
    written = False
    notes: list[str] = []
    if write_card and own:
        write_deltas(folder, deltas, plot_bytes)
        written = True
    elif write_card:
        notes.append(f"{vector} is a registry vector: its cached card was not rewritten")
    table = [
        {"run": r.label, "role": r.role, "scale": r.scale, "task": task, "metric": key,
         "score": res.scores[key], "stderr": res.stderr.get(key), "n": res.n}
        for r in runs for task in task_list for res in [results[r][task]] for key in sorted(res.scores)
    ]
    return EvalReport(
        vector=str(folder), target=str(tgt.ref.id), tasks=task_list, scale=alpha, scales=sweep, control=control,
        control_seed=control_seed, runs=table, deltas=[d.model_dump(mode="json") for d in deltas],
        best_scales={f"{d.benchmark} {d.metric}": d.best_scale for d in deltas if d.best_scale is not None},
        card_written=written, plot=str(folder / PLOT_FILE) if written and plot_bytes else None,
        output_dir=str(output_dir) if output_dir is not None else None,
        seconds=round(time.perf_counter() - t0, 3), harness_version=runner.harness_version, notes=notes,
    )


_TASK_MANAGERS: dict[tuple[str | None, bool], Any] = {}


def _task_manager(lm_eval: Any, include_path: str | Path | None, tasks: list[str]) -> Any:
    """lm-eval's TaskManager over its own tasks and ``include_path``; unknown task names are refused with
    where they were looked for. When every task is a plain task of ``include_path``, lm-eval's own thousands of
    task YAMLs are not indexed (that takes 10–50 s on two cores)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise InvalidOptionError("--include-path", str(include_path), "a folder of task YAML files")
    key = str(Path(include_path).resolve()) if include_path is not None else None

    def manager(defaults: bool) -> Any:
        if (key, defaults) not in _TASK_MANAGERS:  # indexing is slow: once per process
            _TASK_MANAGERS[key, defaults] = TaskManager(include_path=key, include_defaults=defaults)
        return _TASK_MANAGERS[key, defaults]

    if key is not None:
        local = manager(False)
        # groups and tags may name built-in tasks: only plain local tasks are sure to need nothing else
        if set(tasks) <= set(local.all_subtasks):
            return local
    tm = manager(True)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f"{include_path} and " if include_path is not None else ""
        raise InvalidOptionError(
            "--tasks", unknown[0],
            f"a task of {where}lm-eval {getattr(lm_eval, '__version__', '')}'s built-in tasks ({len(known)} known; "
            "`lm_eval ls tasks` lists them); local task YAMLs go in --include-path",
        )
    return tm


# ---------------------------------------------------------------- deltas and statistics


def build_deltas(
    results: dict[Run, dict[str, TaskResult]], runs: list[Run], tasks: list[str], alpha: float, sweep: list[float],
    control: str, control_seed: int, target: str, settings: dict[str, Any], seed: int,
) -> list[BenchmarkDelta]:
    """One BenchmarkDelta per task, metric and filter, with paired tests and the sweep."""
    from ._stats import ALPHA, paired_test

    by_role = {r.role: r for r in runs if r.role != "sweep"}
    plus_at = {r.scale: r for r in runs if r.role in ("plus", "sweep")}
    out = []
    for task in tasks:
        t_res = results[by_role["target"]][task]
        for key in sorted(t_res.scores):
            metric, _, filt = key.partition(",")
            scores = {role: results[run][task].scores.get(key) for role, run in by_role.items()}
            errs = {role: results[run][task].stderr.get(key) for role, run in by_role.items()}
            tests = []
            plus = results[by_role["plus"]][task].per_sample.get(key, {})
            for against in ("target", "control"):
                if against not in by_role:
                    continue
                other = results[by_role[against]][task].per_sample.get(key, {})
                ids = sorted(set(plus) & set(other))
                if not ids:
                    continue
                p = paired_test([plus[i] for i in ids], [other[i] for i in ids], seed=seed)
                tests.append(PairedTest(
                    against=against, method=p.method, n=p.n, diff=p.diff, p_value=p.p_value, mid_p=p.mid_p,
                    plus_only=p.a_only, other_only=p.b_only, distinguishable=p.p_value < ALPHA,
                ))
            higher = t_res.higher_is_better.get(metric, True)
            points = []
            if sweep:
                for a in sorted(set(sweep) | {alpha}):
                    res = results[plus_at[a]][task]
                    if key in res.scores:
                        points.append(SweepPoint(scale=a, score=res.scores[key], stderr=res.stderr.get(key)))
            best = None
            if points:
                best = (max if higher else min)(points, key=lambda pt: pt.score).scale
            have_err = errs["target"] is not None and errs["plus"] is not None
            out.append(BenchmarkDelta(
                benchmark=task, metric=metric, higher_is_better=higher, n=t_res.n,
                harness=HarnessSettings(
                    name="lm-evaluation-harness", version=settings["version"], num_fewshot=t_res.num_fewshot,
                    chat_template=settings["chat_template"], filter=filt or None, task_version=t_res.version,
                    task_hash=t_res.task_hash, limit=settings["limit"], seed=settings["seed"],
                    gen_kwargs=settings["gen_kwargs"], dtype=settings["dtype"],
                ),
                target=target, scale=alpha,
                scores=Scores.model_validate(scores),
                stderr=Scores.model_validate(errs) if have_err else None,
                control_kind=control if control != "none" else None,  # type: ignore[arg-type]
                control_seed=control_seed if control != "none" else None,
                tests=tests, sweep=points, best_scale=best,
            ))
    return out


def write_deltas(folder: Path, deltas: list[BenchmarkDelta], plot: bytes | None) -> VectorCard:
    """Replace the card's deltas with the same key by ``deltas``; put the plot (if any) beside the card and in
    its file manifest. Plot, rvhub.json and README.md are renamed into place together."""
    import hashlib

    from .card import FileEntry

    card = VectorCard.read(folder)
    keys = {d.key for d in deltas}
    kept = [d for d in card.benchmarks if d.key not in keys]
    files = list(card.files)
    extra: dict[str, str | bytes] = {}
    if plot is not None:
        entry = FileEntry(path=PLOT_FILE, size=len(plot), sha256=hashlib.sha256(plot).hexdigest())
        files = [f for f in files if f.path != PLOT_FILE] + [entry]
        extra[PLOT_FILE] = plot
    edited = VectorCard.model_validate({**card.model_dump(), "benchmarks": kept + deltas, "files": files})
    edited.write(folder, extra)
    return edited


def _plot(deltas: list[BenchmarkDelta], alpha: float) -> bytes | None:
    """Score against α, one line per task and metric, with error bars; the target's and the control's levels
    as dashed and dotted lines. PNG bytes (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingExtraError("the sweep plot", "eval", "matplotlib") from e
    import io

    shown = [d for d in deltas if d.sweep]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, d in enumerate(shown):
        color = f"C{i % 10}"
        xs = [p.scale for p in d.sweep]
        ys = [p.score for p in d.sweep]
        errs = [p.stderr or 0.0 for p in d.sweep]
        label = f"{d.benchmark} {d.metric}" + (f" ({d.harness.filter})" if d.harness.filter else "")
        ax.errorbar(xs, ys, yerr=errs, color=color, marker="o", capsize=3, label=label)
        ax.axhline(d.scores.target, color=color, linestyle="--", linewidth=1)
        if d.scores.control is not None:
            ax.plot([alpha], [d.scores.control], color=color, marker="x", markersize=9, linestyle="none")
    ax.set_xlabel("α (target + α·v)")
    ax.set_ylabel("score")
    ax.set_title("score against α; dashed: target alone, ×: control (random, same norm)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def noise_table(deltas: Sequence[BenchmarkDelta]) -> list[str]:
    """Lines of a table: each paired test, its p-value, and whether the difference is distinguishable."""
    lines = [f"{'task':<20} {'metric':<14} {'+v vs':<8} {'diff':>8} {'test':<9} {'p':>9}  distinguishable"]
    for d in deltas:
        for t in d.tests:
            lines.append(
                f"{d.benchmark[:20]:<20} {d.metric[:14]:<14} {t.against:<8} {t.diff:>+8.4f} {t.method:<9} "
                f"{t.p_value:>9.3g}  {'yes' if t.distinguishable else 'no (noise)'}"
            )
    return lines

"""Benchmark `rvhub extract` + `rvhub apply` against mergekit task_arithmetic, a naive torch merge and
the IO floor, on synthetic checkpoints with the shapes of Qwen2.5-0.5B, 1.5B and 3B, with small (1–3 ulp) and
large (N(0, 5%), sign changes) deltas.

    python scripts/bench_extract_apply.py [--shapes 0.5b,1.5b] [--deltas small,large] [--work .bench] [--reps 1]
                                          [--idle-wait 300] [--out docs/BENCHMARKS.md] [--rvhub .venv/bin/rvhub]

`--shapes tiny` is a fast self-test; `--shapes 3b` (three 6 GB models) does not fit a small machine's page
cache. Every measured step runs as its own process, from a warm page cache,
after waiting for other processes to leave the CPU (a rep they disturbed anyway is run again); the report
goes between this script's markers in --out and to stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from _bench_util import (
    DELTAS,
    REPO_ROOT,
    SHAPES,
    Comparison,
    Measurement,
    QuietRuns,
    Shape,
    build_trio,
    compare_checkpoints,
    git_state,
    machine_info,
    md_table,
    measure_quiet,
    package_version,
    quiet_note,
    remove,
    replace_section,
    run_once,
    safetensors_files,
    today,
    tree_size,
)

ALPHA = 1.0
SECTION = "bench_extract_apply"
MERGEKIT_PINS = ("torch==2.13.0", "mergekit==0.1.5")  # torch first: the unpinned one pulls CUDA wheels
MERGEKIT_FLAGS = (
    "--no-cuda", "--device", "cpu", "--no-read-to-gpu", "--no-low-cpu-memory", "--no-multi-gpu",
    "--no-lazy-unpickle", "--no-async-write", "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
)
EXTRACT, APPLY, RVHUB = "(a) extract", "(a) apply", "(a) extract+apply"
MERGEKIT, NAIVE = "(b) mergekit", "(c) naive torch"
MERGEKIT_RSS_PER_MODEL_BYTE = 5.5  # mergekit's measured peak (5.1x at 0.5B), with a margin
FLOOR_APPLY, FLOOR_BOTH = "(d) IO floor apply", "(d) IO floor extract+apply"
ROWS = (EXTRACT, APPLY, RVHUB, MERGEKIT, NAIVE, FLOOR_APPLY, FLOOR_BOTH)
RSS_LIMIT_MB = 1500.0

NAIVE_SCRIPT = '''\
"""Naive merge: load three checkpoints fully, out = target + alpha * (rl - sft) in float32, save bf16."""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load(folder):
    tensors = {}
    for f in sorted(Path(folder).rglob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


sft, rl, target = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
out, alpha = Path(sys.argv[4]), float(sys.argv[5])
merged = {
    name: (t.float() + alpha * (rl[name].float() - sft[name].float())).to(torch.bfloat16)
    for name, t in target.items()
}
out.mkdir(parents=True)
save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
'''

IO_FLOOR_SCRIPT = '''\
"""IO floor: read every tensor of the inputs once, write one model-size file; no arithmetic.

get_tensor returns tensors backed by a lazy mmap, so reading is made real by copying (.clone()) each
tensor of the read-only inputs; the kept model's tensors are read by save_file as it writes them.
"""
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file


def files(folder):
    return sorted(Path(folder).rglob("*.safetensors"))


out, keep, others = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
for folder in others:
    for f in files(folder):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                h.get_tensor(name).clone()
kept = {}
for f in files(keep):
    with safe_open(str(f), framework="pt") as h:
        kept.update({name: h.get_tensor(name) for name in h.keys()})
out.mkdir(parents=True)
save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
'''


@dataclass
class Bench:
    """Paths and settings shared by every shape."""

    work: Path
    reps: int
    rvhub: Path | None
    mergekit_yaml: Path
    idle_wait: float

    @property
    def helpers(self) -> Path:
        return self.work / "helpers"

    @property
    def naive_script(self) -> Path:
        return self.helpers / "naive_merge.py"

    @property
    def floor_script(self) -> Path:
        return self.helpers / "io_floor.py"

    def log(self, shape: Shape, step: str) -> Path:
        return self.work / "logs" / f"{shape.name}-{step}.log"

    def run_dir(self, shape: Shape) -> Path:
        return self.work / "runs" / shape.name


@dataclass
class ShapeResult:
    """Everything measured for one shape."""

    shape: Shape  # named <shape> for small deltas, <shape>-large for large ones
    deltas: str
    model_bytes: int
    timings: dict[str, Measurement] = field(default_factory=dict)
    reps: dict[str, QuietRuns] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    exact: Comparison | None = None
    vector_bytes: int | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- setup


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--shapes", default="0.5b,1.5b", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--deltas", default="small,large", help=f"comma-separated regimes, from {', '.join(DELTAS)}")
    p.add_argument("--work", type=Path, default=REPO_ROOT / ".bench", help="models, venv, scratch outputs")
    p.add_argument("--reps", type=int, default=1, help="runs per step (median wall time, max RSS)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "BENCHMARKS.md", help="Markdown report")
    p.add_argument("--rvhub", type=Path, default=REPO_ROOT / ".venv" / "bin" / "rvhub", help="rvhub CLI")
    p.add_argument("--idle-wait", type=float, default=300.0,
                   help="seconds to wait, before each timed run, for other processes to leave the CPU (0: no wait)")
    args = p.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    unknown += [d for d in args.deltas.split(",") if d not in DELTAS]
    if unknown or args.reps < 1:
        p.error(f"unknown shapes or deltas {unknown}" if unknown else "--reps must be at least 1")
    return args


def ensure_mergekit(venv: Path) -> Path:
    """Install mergekit into its own venv (once) and return its mergekit-yaml."""
    exe = venv / "bin" / "mergekit-yaml"
    wanted = MERGEKIT_PINS[-1].split("==")[1]
    if exe.exists() and package_version("mergekit", venv / "bin" / "python") == wanted:
        return exe
    print(f"installing {' then '.join(MERGEKIT_PINS)} into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pin in MERGEKIT_PINS:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", pin], check=True)
    return exe


def write_helpers(bench: Bench) -> None:
    """Write the naive-merge and IO-floor scripts that run as subprocesses."""
    bench.helpers.mkdir(parents=True, exist_ok=True)
    bench.naive_script.write_text(NAIVE_SCRIPT)
    bench.floor_script.write_text(IO_FLOOR_SCRIPT)


def mergekit_config(sft: Path, rl: Path, target: Path) -> str:
    """task_arithmetic: SFT + α(RL − SFT) + (TARGET − SFT) = TARGET + α(RL − SFT)."""
    def q(path: Path) -> str:
        return json.dumps(str(path))  # a JSON string is a valid double-quoted YAML scalar

    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {q(sft)}\n"
        "models:\n"
        f"  - model: {q(rl)}\n"
        f"    parameters: {{weight: {ALPHA}}}\n"
        f"  - model: {q(target)}\n"
        "    parameters: {weight: 1.0}\n"
        "dtype: float32\n"
        "out_dtype: bfloat16\n"
    )


# --------------------------------------------------------------------------- one shape


def run_shape(bench: Bench, shape: Shape, deltas: str = "small") -> ShapeResult:
    """Build (or reuse) the checkpoints of a shape and delta regime, time every contender and compare their
    outputs."""
    shape = shape if deltas == "small" else replace(shape, name=f"{shape.name}-{deltas}")
    check_disk(shape, bench.work)
    print(f"[{shape.name}] building or reusing checkpoints ...", flush=True)
    trio = build_trio(shape, bench.work / "models", deltas=deltas)
    result = ShapeResult(shape, deltas, sum(f.stat().st_size for f in safetensors_files(trio.sft)))
    # the naive merge holds the three models and its output in memory at once (4 models' bytes, in bf16)
    naive_fits = 4 * result.model_bytes < _page_cache_bytes() * 0.8
    if not naive_fits:
        result.notes.append(f"(c) naive torch skipped: it holds 4 models ({4 * result.model_bytes / 1e9:.1f} GB) in "
                            f"memory, more than 80% of this machine's {_page_cache_bytes() / 1e9:.1f} GB")
    # mergekit (these flags, CPU) peaked at 5.1x the model's bytes at 0.5B (5,064 MB for 988 MB): skip it where
    # that cannot fit, rather than have the kernel kill it (or the benchmark) half-way
    mergekit_fits = MERGEKIT_RSS_PER_MODEL_BYTE * result.model_bytes < _page_cache_bytes() * 0.8
    if not mergekit_fits:
        need = MERGEKIT_RSS_PER_MODEL_BYTE * result.model_bytes / 1e9
        result.notes.append(f"(b) mergekit skipped: at 0.5B it peaked at 5.1x the model's bytes; at "
                            f"{MERGEKIT_RSS_PER_MODEL_BYTE}x, ~{need:.0f} GB here, more than 80% of this machine's "
                            f"{_page_cache_bytes() / 1e9:.1f} GB")
    runs = bench.run_dir(shape)
    remove(runs)
    vec, out_a, out_b, out_c = (runs / n for n in ("vector", "out_rvhub", "out_mergekit", "out_naive"))
    py, naive, floor = sys.executable, bench.naive_script, bench.floor_script

    def step(row: str, cmd: Sequence[str | Path], inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
        print(f"[{shape.name}] {row} ...", flush=True)
        tag = row.split(") ", 1)[1].replace(" ", "_").replace("+", "_")
        runs = measure_quiet([str(c) for c in cmd], bench.log(shape, tag), bench.reps, inputs, outputs,
                             bench.idle_wait, f"[{shape.name}]")
        result.reps[row] = runs
        result.timings[row] = m = runs.measurement
        print(f"[{shape.name}] {row}: {m.wall_s:.2f} s, {m.peak_rss_mb:.0f} MB", flush=True)

    if bench.rvhub:
        rv = bench.rvhub
        step(EXTRACT, [rv, "extract", "--from", trio.sft, "--to", trio.rl, "-o", vec, "--quiet", "--json"],
             [trio.sft, trio.rl], [vec])
        step(APPLY, [rv, "apply", vec, "--base", trio.target, "-o", out_a, "--scale", str(ALPHA), "--quiet",
                     "--json"], [vec, trio.target], [out_a])
        result.timings[RVHUB] = Measurement.combine([result.timings[EXTRACT], result.timings[APPLY]])
        result.vector_bytes = tree_size(vec)
        result.exact = check_exact(rv, vec, trio.sft, trio.rl, runs / "out_exact", bench.log(shape, "exact"))
        step(FLOOR_APPLY, [py, floor, runs / "floor", trio.target, vec], [trio.target, vec], [runs / "floor"])
    step(FLOOR_BOTH, [py, floor, runs / "floor", trio.target, trio.sft, trio.rl],
         [trio.target, trio.sft, trio.rl], [runs / "floor"])
    remove(runs / "floor")
    if naive_fits:
        step(NAIVE, [py, naive, trio.sft, trio.rl, trio.target, out_c, str(ALPHA)],
             [trio.sft, trio.rl, trio.target], [out_c])
    if mergekit_fits:
        config = bench.helpers / f"mergekit-{shape.name}.yml"
        config.write_text(mergekit_config(trio.sft, trio.rl, trio.target))
        step(MERGEKIT, [bench.mergekit_yaml, config, out_b, *MERGEKIT_FLAGS], [trio.sft, trio.rl, trio.target],
             [out_b])

    print(f"[{shape.name}] comparing outputs ...", flush=True)
    pairs = [("(b) mergekit vs (c) naive torch", out_b, out_c)] if naive_fits and mergekit_fits else []
    if bench.rvhub:
        if naive_fits:
            pairs.insert(0, ("(a) rvhub vs (c) naive torch", out_a, out_c))
        if mergekit_fits:
            pairs.append(("(a) rvhub vs (b) mergekit", out_a, out_b))
    result.comparisons = {label: compare_checkpoints(x, y) for label, x, y in pairs}
    remove(runs)
    return result


def check_exact(rvhub: Path, vec: Path, sft: Path, rl: Path, out: Path, log: Path) -> Comparison:
    """Apply the vector to SFT (α = 1) and compare with RL bit for bit."""
    remove(out)
    run_once([str(rvhub), "apply", str(vec), "--base", str(sft), "-o", str(out), "--scale", "1.0", "--quiet",
              "--json"], log)
    comparison = compare_checkpoints(out, rl)
    remove(out)
    return comparison


# --------------------------------------------------------------------------- report


def shape_title(r: ShapeResult) -> str:
    base = r.shape.name.removesuffix(f"-{r.deltas}")
    name = "tiny self-test shape" if base == "tiny" else f"Qwen2.5-{base.upper()} shape"
    return (f"{name}, {r.deltas} deltas ({r.shape.n_params() / 1e6:,.1f}M parameters, bf16 weights "
            f"{r.model_bytes / 1e6:,.1f} MB)")


def timing_table(r: ShapeResult, skip_reason: str) -> str:
    base = r.timings.get(MERGEKIT)
    rows = []
    for row in ROWS:
        m = r.timings.get(row)
        if m is None:
            rows.append([row, "—", "—", "—", skip_reason, "—"])
            continue
        ratio = f"{base.wall_s / m.wall_s:.2f}×" if base else "—"
        reps = r.reps[row].reps if row in r.reps else []
        walls = ", ".join(f"{x.wall_s:.2f}" for x in reps) or "sum of the two rows above"
        other = ", ".join(f"{x.other_cores:.2f}" for x in reps) or "—"
        rows.append([row, f"{m.wall_s:.2f}", walls, f"{m.peak_rss_mb:,.0f}", ratio, other])
    return md_table(["step", "wall s", "each rep", "peak RSS MB", "vs mergekit", "other processes, cores"], rows)


def equality_lines(r: ShapeResult) -> list[str]:
    lines = [f"- {label}: {c.describe()}" for label, c in r.comparisons.items()]
    if r.exact is not None:
        verdict = "yes" if r.exact.identical else f"no ({r.exact.describe()})"
        lines.append(f"- `rvhub apply VEC --base SFT` reproduces RL bit for bit: {verdict}")
    if r.vector_bytes is not None:
        lines.append(f"- vector folder: {r.vector_bytes / 1e6:,.1f} MB = "
                     f"{r.vector_bytes / r.model_bytes:.3f}× the bf16 model file")
    return lines


def ratio(r: ShapeResult, slow: str, fast: str) -> float | None:
    a, b = r.timings.get(slow), r.timings.get(fast)
    return a.wall_s / b.wall_s if a and b else None


def verdict(value: float | None, limit: float, at_least: bool, fmt: str) -> str:
    if value is None:
        return "n/a"
    ok = value >= limit if at_least else value <= limit
    return f"{'pass' if ok else 'FAIL'} ({fmt.format(value)})"


def target_rows(results: Sequence[ShapeResult]) -> list[list[str]]:
    """The issue's targets, with pass/fail computed from the measurements."""
    rows = []
    for r in results:
        n = r.shape.name
        rss = r.timings[RVHUB].peak_rss_mb if RVHUB in r.timings else None
        vec = r.vector_bytes / r.model_bytes if r.vector_bytes is not None else None
        x = "{:.2f}×"
        rows += [
            [f"{n}: extract+apply ≥ 2× faster than mergekit", verdict(ratio(r, MERGEKIT, RVHUB), 2, True, x)],
            [f"{n}: apply alone ≥ 3× faster than mergekit", verdict(ratio(r, MERGEKIT, APPLY), 3, True, x)],
            [f"{n}: apply ≤ 2× the IO floor (apply)", verdict(ratio(r, APPLY, FLOOR_APPLY), 2, False, x)],
            [f"{n}: rvhub peak RSS ≤ 1.5 GB", verdict(rss, RSS_LIMIT_MB, False, "{:,.0f} MB")],
            [f"{n}: sparse vector ≤ 0.35× the bf16 model", verdict(vec, 0.35, False, "{:.3f}×")],
        ]
    rss_by_shape = {r.shape.name: r.timings[RVHUB].peak_rss_mb for r in results if RVHUB in r.timings}
    for other in ("1.5b", "3b"):
        label = f"rvhub peak RSS within 20% between 0.5b and {other}"
        if {"0.5b", other} <= rss_by_shape.keys():
            small, large = rss_by_shape["0.5b"], rss_by_shape[other]
            growth = max(small, large) / min(small, large)
            rows.append([label, verdict(growth, 1.2, False, f"{small:,.0f} → {large:,.0f} MB, {{:.2f}}×")])
        elif other == "3b":
            rows.append([label, "n/a (needs both shapes measured)"])
    return rows


def render(results: Sequence[ShapeResult], bench: Bench, command: str, rvhub_note: str) -> str:
    m = machine_info()
    mk_python = bench.mergekit_yaml.parent / "python"
    mk_versions = ", ".join(f"{p} {package_version(p, mk_python)}"
                            for p in ("mergekit", "torch", "transformers", "safetensors"))
    here = ", ".join(f"{p} {package_version(p)}" for p in ("torch", "safetensors", "transformers", "numpy"))
    parts = [
        "## rvhub extract/apply vs mergekit task_arithmetic",
        "",
        f"- Command: `{command}`",
        f"- Date: {today()}",
        f"- Machine: {m['cores']} cores, {m['ram']} RAM, {m['cpu']} ({m['os']}, Python {m['python']})",
        f"- Benchmark interpreter ({sys.executable}): {here}",
        f"- rvhub: {rvhub_note}",
        f"- mergekit: {mk_versions}, in its own venv, installed with "
        + " then ".join(f"`pip install {pin}`" for pin in MERGEKIT_PINS),
        f"- mergekit command: `mergekit-yaml CONFIG OUT {' '.join(MERGEKIT_FLAGS)}`"
        " (env CUDA_VISIBLE_DEVICES='', HF_HUB_OFFLINE=1), CONFIG:",
        "",
        "```yaml",
        mergekit_config(Path("SFT"), Path("RL"), Path("TARGET")).rstrip(),
        "```",
        "",
        "Method: synthetic checkpoints in the Hugging Face layout (bf16, tied embeddings, random N(0, 0.02)"
        " weights); deltas: " + "; ".join(f"{k}: {v}" for k, v in DELTAS.items()) + "; TARGET = SFT + N(0, 0.002)."
        f" α = {ALPHA}. Each step is a separate process started from a warm page cache with dirty pages"
        " flushed; wall time includes interpreter start-up and imports; peak RSS is the child's `ru_maxrss`"
        " from `wait4` (mapped file pages that were touched count too; ~11 MB is the launcher's floor)."
        f" Wall time is the median of {bench.reps} run(s), RSS the max. \"vs mergekit\" = mergekit wall /"
        " step wall (> 1 is faster than mergekit). The IO floor reads each input tensor once with"
        " safetensors (`safe_open` + `get_tensor`; tensors it does not write are also `.clone()`d, because"
        " `get_tensor` maps the file lazily) and writes one model-size file with `save_file`.",
    ]
    skip = "skipped: rvhub not found" if bench.rvhub is None else ""
    for r in results:
        parts += ["", f"### {shape_title(r)}", "", timing_table(r, skip), "", *equality_lines(r)]
        parts += [f"- {note}." for note in r.notes]
        parts.append("- " + quiet_note(r.reps, bench.idle_wait) + ".")
        if r.shape.name.startswith("3b") or r.model_bytes * 3 > _page_cache_bytes():
            parts.append(f"- The three models ({3 * r.model_bytes / 1e9:.1f} GB) do not fit this machine's memory "
                         "as page cache: these times include reading from disk.")
    parts += ["", "### Targets", "", md_table(["target", "result"], target_rows(results))]
    if any(r.shape.name == "tiny" for r in results):
        parts += ["", "_Tiny self-test shape: timings are dominated by start-up and mean nothing._"]
    return "\n".join(parts) + "\n"


def check_disk(shape: Shape, work: Path) -> None:
    """Refuse, before anything is built, a shape whose checkpoints and outputs cannot fit the free disk: three
    models (unless cached) and, at the peak, the vector plus four model-size outputs (rvhub, mergekit, naive,
    the IO floor or the exactness check), with 10% to spare."""
    model = 2 * shape.n_params()  # bf16
    cached = (work / "models" / shape.name / "recipe.json").is_file()
    need = int(((0 if cached else 3) + 4.5) * model * 1.1)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"[{shape.name}] needs ~{need / 1e9:.0f} GB free under {work} "
                         f"({'' if cached else 'three models and '}model-size outputs); {free / 1e9:.0f} GB are free. "
                         "Free space, or pass --work on a larger disk.")


def _page_cache_bytes() -> int:
    """MemTotal: the most page cache the machine could hold."""
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    work: Path = args.work.resolve()
    rvhub = args.rvhub.resolve() if args.rvhub.exists() else None
    if rvhub:
        rvhub_note = f"{package_version('rvhub', rvhub.parent / 'python')} ({rvhub}), source {git_state()}"
    else:
        rvhub_note = f"not found at {args.rvhub}: (a), (d) IO floor apply and (a)'s comparisons skipped"
        print(f"warning: {rvhub_note}", file=sys.stderr)
    bench = Bench(work, args.reps, rvhub, ensure_mergekit(work / "mergekit-venv"), args.idle_wait)
    write_helpers(bench)
    results = [run_shape(bench, SHAPES[name], deltas) for name in args.shapes.split(",")
               for deltas in args.deltas.split(",")]
    command = shlex.join(["python", "scripts/bench_extract_apply.py", *(argv or sys.argv[1:])])
    report = render(results, bench, command, rvhub_note)
    print("\n" + report)
    replace_section(args.out, SECTION, report)
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark `rvhub combine` + `rvhub apply` (two sparse vectors onto a target) against mergekit `linear`
over the five models that give the same result, TARGET + (RL₁ − SFT₁) + (RL₂ − SFT₂), in float32.

    python scripts/bench_combine.py [--shapes 0.5b] [--work .bench] [--reps 1] [--idle-wait 300]
                                    [--out docs/BENCHMARKS.md] [--rvhub .venv/bin/rvhub] [--no-mergekit]

`--shapes tiny --no-mergekit --idle-wait 0` is a fast self-test. The first pair is bench_extract_apply's trio
(SFT₁, RL₁, TARGET); SFT₂ is a noisy sibling of SFT₁ (so the two vectors' `from` fingerprints agree) and RL₂
moves ~20% of SFT₂'s elements by 1–3 bf16 ulps. The vectors are extracted once, untimed; the timed rvhub
steps are combine and apply, each its own process, as for mergekit. Every output is compared bit for bit
with a float32 reference computed here, ``bf16(T + ((RL₁ − SFT₁) + (RL₂ − SFT₂)))``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from _bench_util import (
    REPO_ROOT,
    SHAPES,
    Comparison,
    Measurement,
    QuietRuns,
    Shape,
    Trio,
    _rl_tensor,
    _target_tensor,
    _write_hf_folder,
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
from bench_extract_apply import MERGEKIT_FLAGS, MERGEKIT_PINS, ensure_mergekit

SECTION = "bench_combine"
COMBINE, APPLY, RVHUB, MERGEKIT = "(a) combine", "(a) apply", "(a) combine+apply", "(b) mergekit linear"
RSS_LIMIT_MB = 1500.0
PAIR2_VERSION = 1


def build_pair2(shape: Shape, trio: Trio, models_dir: Path) -> tuple[Path, Path]:
    """SFT₂ (a sibling of SFT₁) and RL₂, built once per shape and reused."""
    from safetensors.torch import load_file

    final = models_dir / f"{shape.name}-pair2"
    stamp = final / "recipe.json"
    recipe = {"version": PAIR2_VERSION, "shape": shape.__dict__}
    sft2, rl2 = final / "sft2", final / "rl2"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return sft2, rl2
    scratch = models_dir / f"{shape.name}-pair2.partial"
    remove(scratch)
    remove(final)
    sft1 = load_file(str(trio.sft / "model.safetensors"))
    sft = {name: _target_tensor(t, 7_000_003 + 5 * i) for i, (name, t) in enumerate(sorted(sft1.items()))}
    del sft1
    _write_hf_folder(scratch / "sft2", shape, sft)
    rl = {name: _rl_tensor(t, 9_000_011 + 5 * i) for i, (name, t) in enumerate(sorted(sft.items()))}
    _write_hf_folder(scratch / "rl2", shape, rl)
    (scratch / "recipe.json").write_text(json.dumps(recipe))
    scratch.rename(final)
    return sft2, rl2


def mergekit_config(target: Path, rl1: Path, sft1: Path, rl2: Path, sft2: Path) -> str:
    """linear, not normalised: T + RL₁ − SFT₁ + RL₂ − SFT₂, summed in float32, written as bfloat16."""
    def entry(path: Path, weight: float) -> str:
        return f"  - model: {json.dumps(str(path))}\n    parameters: {{weight: {weight}}}\n"

    return ("merge_method: linear\nparameters: {normalize: false}\nmodels:\n" + entry(target, 1.0) + entry(rl1, 1.0)
            + entry(sft1, -1.0) + entry(rl2, 1.0) + entry(sft2, -1.0) + "dtype: float32\nout_dtype: bfloat16\n")


def write_reference(target: Path, pairs: Sequence[tuple[Path, Path]], out: Path) -> None:
    """bf16(T + ((RL₁ − SFT₁) + (RL₂ − SFT₂))) in float32, one tensor at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def get(folder: Path, name: str):  # noqa: ANN202
        with safe_open(str(folder / "model.safetensors"), framework="pt") as h:
            return h.get_tensor(name)

    with safe_open(str(target / "model.safetensors"), framework="pt") as h:
        names = list(h.keys())
    result = {}
    for name in names:
        v = None
        for sft, rl in pairs:
            d = get(rl, name).float() - get(sft, name).float()
            v = d if v is None else v + d
        t = get(target, name)
        result[name] = (t.float() + v).to(t.dtype)
    out.mkdir(parents=True)
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})


def run_shape(args: argparse.Namespace, shape: Shape, rvhub: Path, mergekit: Path | None) -> dict:
    work: Path = args.work
    print(f"[{shape.name}] building or reusing checkpoints ...", flush=True)
    trio = build_trio(shape, work / "models")
    sft2, rl2 = build_pair2(shape, trio, work / "models")
    runs = work / "runs" / f"combine-{shape.name}"
    remove(runs)
    v1, v2, comb, out_a, out_b, ref = (runs / n for n in ("v1", "v2", "combined", "out_rvhub", "out_mergekit",
                                                             "reference"))
    logs = work / "logs"
    for vec, sft, rl in ((v1, trio.sft, trio.rl), (v2, sft2, rl2)):
        run_once([str(rvhub), "extract", "--from", str(sft), "--to", str(rl), "-o", str(vec), "--quiet"],
                 logs / f"{shape.name}-combine-extract-{vec.name}.log")
    reps: dict[str, QuietRuns] = {}
    steps: list[tuple[str, Sequence[str | Path], Sequence[Path], Sequence[Path]]] = [
        (COMBINE, [rvhub, "combine", v1, v2, "-o", comb, "--quiet", "--json"], [v1, v2], [comb]),
        (APPLY, [rvhub, "apply", comb, "--base", trio.target, "-o", out_a, "--quiet", "--json"],
         [comb, trio.target], [out_a]),
    ]
    if mergekit is not None:
        config = work / "helpers" / f"mergekit-linear-{shape.name}.yml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(mergekit_config(trio.target, trio.rl, trio.sft, rl2, sft2))
        steps.append((MERGEKIT, [mergekit, config, out_b, *MERGEKIT_FLAGS],
                      [trio.target, trio.rl, trio.sft, rl2, sft2], [out_b]))
    # the reps are interleaved (combine, apply, mergekit; then again), so that a drift in this VM's speed
    # during the run reaches both sides alike instead of whichever ran last
    for i in range(args.reps):
        for row, cmd, inputs, outputs in steps:
            print(f"[{shape.name}] {row}, round {i + 1} of {args.reps} ...", flush=True)
            tag = row.split(") ", 1)[1].replace(" ", "_").replace("+", "_")
            q = measure_quiet([str(c) for c in cmd], logs / f"{shape.name}-combine-{tag}.log", 1, inputs,
                              outputs, args.idle_wait, f"[{shape.name}]")
            if row in reps:
                reps[row].reps += q.reps
                reps[row].discarded += q.discarded
            else:
                reps[row] = q
    timings = {row: q.measurement for row, q in reps.items()}
    for row, m in timings.items():
        print(f"[{shape.name}] {row}: {m.wall_s:.2f} s, {m.peak_rss_mb:.0f} MB", flush=True)
    timings[RVHUB] = Measurement.combine([timings[COMBINE], timings[APPLY]])
    rounds = [m.wall_s / (c.wall_s + a.wall_s) for c, a, m in
              zip(reps[COMBINE].reps, reps[APPLY].reps, reps[MERGEKIT].reps, strict=True)] if mergekit else []
    combined_bytes = tree_size(comb)
    print(f"[{shape.name}] comparing outputs ...", flush=True)
    write_reference(trio.target, [(trio.sft, trio.rl), (sft2, rl2)], ref)
    comparisons: dict[str, Comparison] = {"(a) rvhub vs float32 reference": compare_checkpoints(out_a, ref)}
    if mergekit is not None:
        comparisons["(b) mergekit vs float32 reference"] = compare_checkpoints(out_b, ref)
        comparisons["(a) rvhub vs (b) mergekit"] = compare_checkpoints(out_a, out_b)
    model_bytes = sum(f.stat().st_size for f in safetensors_files(trio.sft))
    remove(runs)
    return {"shape": shape, "timings": timings, "reps": reps, "comparisons": comparisons,
            "combined_bytes": combined_bytes, "model_bytes": model_bytes, "rounds": rounds}


def render(results: Sequence[dict], command: str, rvhub_note: str, mergekit: Path | None, idle_wait: float) -> str:
    lines = [
        "## rvhub combine + apply vs mergekit linear (two vectors onto a target)",
        "",
        f"- Date: {today()}; command: `{command}`",
        f"- Machine: {', '.join(f'{k} {v}' for k, v in machine_info().items())}",
        f"- rvhub: {rvhub_note}",
        (f"- mergekit: {package_version('mergekit', mergekit.parent / 'python')}, its own venv ("
         + " then ".join(f"`pip install {p}`" for p in MERGEKIT_PINS) + f"); `mergekit-yaml CONFIG OUT "
         f"{' '.join(MERGEKIT_FLAGS)}`") if mergekit else "- mergekit: not run (--no-mergekit)",
        "- mergekit config:",
        "",
        "```yaml",
        mergekit_config(Path("TARGET"), Path("RL1"), Path("SFT1"), Path("RL2"), Path("SFT2")).rstrip(),
        "```",
    ]
    for r in results:
        t: dict[str, Measurement] = r["timings"]
        base = t.get(MERGEKIT)
        rows = []
        for row in (COMBINE, APPLY, RVHUB, MERGEKIT):
            if row in t:
                m = t[row]
                speed = f"{base.wall_s / m.wall_s:.2f}x" if base and row != MERGEKIT else ""
                rows.append([row, f"{m.wall_s:.2f}", f"{m.peak_rss_mb:.0f}", speed])
        lines += ["", f"### {r['shape'].name} ({r['model_bytes'] / 1e9:.2f} GB per model, combined vector "
                      f"{r['combined_bytes'] / 1e6:.1f} MB)", "",
                  md_table(["step", "wall s", "peak RSS MB", "vs mergekit"], rows), ""]
        lines += [f"- {label}: {c.describe()}" for label, c in r["comparisons"].items()]
        ok_rss = t[RVHUB].peak_rss_mb <= RSS_LIMIT_MB
        lines.append(f"- rvhub peak RSS ≤ {RSS_LIMIT_MB:.0f} MB: {'yes' if ok_rss else 'NO'}")
        if base:
            rounds = r["rounds"]
            lines.append(f"- combine+apply ≥ 2× faster than mergekit: "
                         f"{'yes' if base.wall_s / t[RVHUB].wall_s >= 2 else 'NO'} on the medians; in "
                         f"{sum(x >= 2 for x in rounds)} of {len(rounds)} rounds")
            lines.append("- Each round, mergekit's time over combine + apply's (the reps run interleaved: combine, "
                         "apply, mergekit, then again): " + ", ".join(f"{x:.2f}x" for x in rounds)
                         + f"; the lowest {min(rounds):.2f}x")
        lines.append("- " + quiet_note(r["reps"], idle_wait))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--shapes", default="0.5b", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--work", type=Path, default=REPO_ROOT / ".bench")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "BENCHMARKS.md")
    p.add_argument("--rvhub", type=Path, default=REPO_ROOT / ".venv" / "bin" / "rvhub")
    p.add_argument("--idle-wait", type=float, default=300.0)
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit (a self-test of the rvhub side)")
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown or args.reps < 1:
        p.error(f"unknown shapes {unknown}" if unknown else "--reps must be at least 1")
    rvhub = args.rvhub.resolve()
    if not rvhub.exists():
        p.error(f"no rvhub CLI at {args.rvhub}")
    mergekit = None if args.no_mergekit else ensure_mergekit(args.work / "mergekit-venv")
    results = [run_shape(args, SHAPES[s], rvhub, mergekit) for s in args.shapes.split(",")]
    command = shlex.join(["python", "scripts/bench_combine.py", *(argv or sys.argv[1:])])
    note = f"{package_version('rvhub', rvhub.parent / 'python')} ({rvhub}), source {git_state()}"
    report = render(results, command, note, mergekit, args.idle_wait)
    print("\n" + report)
    if not args.no_mergekit:  # a self-test does not overwrite the measured report
        replace_section(args.out, SECTION, report)
        print(f"report written to {args.out}")


if __name__ == "__main__":
    main()

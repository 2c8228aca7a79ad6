"""Benchmark `rvhub eval` (target, +v, −v, control: 4 runs on one loaded model, in memory) against the by-hand
way (write the three merged models to disk with `rvhub apply` and a control merge, then the `lm_eval` CLI four
times), on synthetic Qwen2 checkpoints of the shape of Qwen2.5-0.5B and a small local task.

    python scripts/bench_eval.py [--shapes 0.5b] [--work .bench] [--docs 100] [--batch-size 8] [--idle-wait 300]
                                 [--out docs/BENCHMARKS.md]

`--shapes tiny --docs 8` is a fast self-test. Targets (issue 12): ≥ 2× faster end to end, peak RSS of
`rvhub eval` ≤ one model copy + 1 GB. Every step runs as its own process (wall time and peak RSS of that
process); the report goes between this script's markers in --out and to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from _bench_util import (
    REPO_ROOT,
    SHAPES,
    Measurement,
    build_trio,
    git_state,
    machine_info,
    md_table,
    measure_quiet,
    package_version,
    quiet_note,
    remove,
    replace_section,
    run_once,
    today,
    tree_size,
)

SECTION = "bench_eval"
TASK = "rvhub_bench_yesno"
RSS_SLACK_MB = 1000.0

CONTROL_SCRIPT = '''\
"""By hand: target + r (a per-tensor Gaussian of v's norm, seed 0), merged and saved to disk."""
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from rvhub import add_vector
from rvhub.formats import open_vector
from rvhub.inmemory import Control
vec, target, out = sys.argv[1:4]  # and the dtype to load the target in: sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(target, dtype=getattr(torch, sys.argv[4]))
add_vector(model, Control(open_vector(__import__("pathlib").Path(vec)), "gaussian", 0), 1.0)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(target).save_pretrained(out)
'''


def write_task(folder: Path, n: int) -> Path:
    """A local multiple-choice task (YAML over JSONL): n prompts of six words, answer yes or no."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog two plus three five four twenty".split()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=6)) + " ?",
                                        "label": rng.randint(0, 1)}) + "\n" for _ in range(n)))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files: {json.dumps(str(data))}\n"
        "test_split: train\noutput_type: multiple_choice\ndoc_to_text: \"{{text}}\"\n"
        "doc_to_choice: [\"yes\", \"no\"]\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    return folder


def add_tokenizers(trio: object) -> None:
    """The synthetic checkpoints have no tokenizer; give all three the same small one (ids stay in range)."""
    from rvhub.toy import save_tokenizer

    for role in ("sft", "rl", "target"):
        folder = getattr(trio, role)
        if not (folder / "tokenizer.json").is_file():
            save_tokenizer(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0.5b")
    ap.add_argument("--work", type=Path, default=REPO_ROOT / ".bench")
    ap.add_argument("--docs", type=int, default=100, help="examples in the local task")
    ap.add_argument("--batch-size", default="8")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the dtype both ways run the model in (the merged models are written in it)")
    ap.add_argument("--idle-wait", type=float, default=300.0)
    ap.add_argument("--out", type=Path, default=None, help="a Markdown file to put the report in")
    ap.add_argument("--rvhub", default=str(Path(sys.executable).parent / "rvhub"))
    ap.add_argument("--lm-eval", default=str(Path(sys.executable).parent / "lm_eval"))
    args = ap.parse_args(argv)

    from rvhub.extract import extract

    sections = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        trio = build_trio(shape, args.work / "models-eval")  # its own copy: it adds tokenizers to the trio
        add_tokenizers(trio)
        work = args.work / f"eval-{name}"
        remove(work)
        work.mkdir(parents=True)
        vec = work / "vec"
        extract(str(trio.sft), str(trio.rl), vec, progress=False)
        tasks = write_task(work / "tasks", args.docs)
        logs = work / "logs"
        common = ["--tasks", TASK, "--include_path", str(tasks), "--batch_size", args.batch_size]

        rows: dict[str, Measurement] = {}
        noise = {}
        ours = [args.rvhub, "eval", str(vec), "--base", str(trio.target), "--tasks", TASK, "--include-path",
                str(tasks), "--batch-size", args.batch_size, "--dtype", args.dtype, "--no-card", "--quiet", "--json"]
        q = measure_quiet(ours, logs / "rvhub_eval.log", args.reps, [trio.target, vec], [], args.idle_wait,
                          "rvhub eval")
        rows["(a) rvhub eval, 4 runs in memory"] = q.measurement
        noise["rvhub eval"] = q

        by_hand: list[Measurement] = []
        merged = {"plus": work / "m_plus", "minus": work / "m_minus", "control": work / "m_control"}
        for role, scale in (("plus", 1.0), ("minus", -1.0)):
            cmd = [args.rvhub, "apply", str(vec), "--base", str(trio.target), "-o", str(merged[role]),
                   "--scale", str(scale), "--dtype", args.dtype, "--quiet"]
            by_hand.append(run_once(cmd, logs / f"apply_{role}.log"))
        ctl = work / "control.py"
        ctl.write_text(CONTROL_SCRIPT)
        by_hand.append(run_once([sys.executable, str(ctl), str(vec), str(trio.target), str(merged["control"]),
                                 args.dtype],
                                logs / "control.log"))
        for label, folder in (("target", trio.target), *merged.items()):
            cmd = [args.lm_eval, "run", "--model", "hf", "--model_args", f"pretrained={folder}", f"dtype={args.dtype}",
                   *common]
            by_hand.append(run_once(cmd, logs / f"lm_eval_{label}.log"))
        total = Measurement.combine(by_hand)
        rows["(b) by hand: 3 merged models + 4× lm_eval"] = total
        disk = sum(tree_size(p) for p in merged.values())
        for p in merged.values():
            remove(p)

        # one model copy in memory, in the dtype it runs in (the checkpoint is bf16)
        model_mb = tree_size(trio.target) / 1e6 * (2 if args.dtype == "float32" else 1)
        a = rows["(a) rvhub eval, 4 runs in memory"]
        speedup = total.wall_s / a.wall_s
        table = md_table(
            ["way", "wall s", "peak RSS MB"],
            [[k, f"{m.wall_s:.1f}", f"{m.peak_rss_mb:.0f}"] for k, m in rows.items()],
        )
        sections.append(
            f"### {name} ({shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}; run in {args.dtype}, "
            f"model {model_mb:,.0f} MB)\n\n{table}\n\nspeed-up {speedup:.2f}× (target ≥ 2×); peak RSS of rvhub eval "
            f"{a.peak_rss_mb:,.0f} MB against one model copy + 1 GB = {model_mb + RSS_SLACK_MB:,.0f} MB "
            f"({'met' if a.peak_rss_mb <= model_mb + RSS_SLACK_MB else 'NOT met'}); the by-hand way also wrote "
            f"{disk / 1e9:.2f} GB of merged models. {args.docs} examples, batch size {args.batch_size}, "
            f"{args.reps} rep(s) of rvhub eval, 1 of each by-hand step.\n\n{quiet_note(noise, args.idle_wait)}"
        )
    m = machine_info()
    info = f"{m['cores']} cores, {m['ram']}, {m['cpu']}"
    body = (
        f"## rvhub eval against the by-hand way ({args.dtype})\n\n_{today()}, rvhub {git_state()}, lm-eval "
        f"{package_version('lm_eval')}, torch {package_version('torch')}, {info}_\n\n"
        f"`python scripts/bench_eval.py --shapes {args.shapes} --docs {args.docs} --batch-size {args.batch_size}"
        + (f" --dtype {args.dtype}`" if args.dtype != "bfloat16" else "`")
        + "\n\n" + "\n\n".join(sections)
    )
    print(body)
    if args.out is not None:
        replace_section(args.out, SECTION if args.dtype == "bfloat16" else f"{SECTION}_{args.dtype}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job end to end, offline, on the trained toy family (rvhub.toy.build_family; cached).

v = rl − sft, where rl is sft trained further with GRPO: extract (exact) → compress to a LoRA adapter → rvhub eval
on target (target, +v, −v and a Gaussian control of v's per-tensor norm; lm-eval on the family's held-out test
tasks, paired McNemar tests) → card → push to a local registry folder → search and info → pull --apply onto
target → the problems target got wrong and the merged model got right → load the adapter with PEFT and compare
it with rvhub's application. Run with `make demo`; output goes to demo-out/ (rebuilt each run), the family to
the rvhub cache (RVHUB_CACHE). Whatever the numbers say is what it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent / "demo-out"
REPO = "demo/toy-grpo-reasoning-vector"
TASK, ADV_TASK = "rvhub_toy", "rvhub_toy_adv"
LIMIT = 600  # the whole held-out test set, one task and one batch per run: 4 generate calls in all
RANK = 16
EXAMPLES = 3
ALPHA = 0.05
# nothing is downloaded: every Hugging Face library works from local files only
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
QUIET = {"extract", "compress", "apply", "eval", "push", "pull"}  # the commands with a progress bar


def rvhub(*args: str, check: bool = True) -> Any:
    """Run the rvhub CLI as a user would, with --json; its summary as a dict."""
    cmd = [sys.executable, "-m", "rvhub", *args, "--json", *(["--quiet"] if args[0] in QUIET else [])]
    print("$ rvhub " + shlex.join(args), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE})
    if done.returncode and (check or not done.stdout.strip()):
        sys.exit(f"rvhub failed:\n{done.stderr}")
    print(f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
    return json.loads(done.stdout)


# ---------------------------------------------------------------- the pieces the tests check


@dataclass(frozen=True)
class Sample:
    """One test problem as lm-eval logged it for one run."""

    doc_id: int
    question: str
    answer: str
    response: str
    correct: bool


def read_samples(path: Path, filter_name: str = "final-answer") -> dict[int, Sample]:
    """doc_id → Sample from an lm-eval samples JSONL file (rvhub eval --output-dir), for one filter."""
    out: dict[int, Sample] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        s = json.loads(line)
        if s.get("filter") != filter_name:
            continue
        resps = s.get("resps") or [[""]]
        first = resps[0][0] if resps and resps[0] else ""
        doc = s.get("doc") or {}
        out[int(s["doc_id"])] = Sample(int(s["doc_id"]), str(doc.get("question", "")), str(s.get("target", "")),
                                       str(first), float(s.get("exact_match", 0.0)) == 1.0)
    return out


def wrong_to_right(target: dict[int, Sample], merged: dict[int, Sample], k: int) -> tuple[list[tuple[Sample, Sample]],
                                                                                          int]:
    """The first ``k`` problems (in test-set order) that target got wrong and the merged model got right, and
    how many such problems there are in all. No other selection."""
    ids = [i for i in sorted(target.keys() & merged.keys()) if not target[i].correct and merged[i].correct]
    return [(target[i], merged[i]) for i in ids[:k]], len(ids)


def _fmt(score: float | None, err: float | None) -> str:
    if score is None:
        return "–"
    return f"{score:.3f} ± {err:.3f}" if err is not None else f"{score:.3f}"


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}"


def accuracy_table(report: dict[str, Any]) -> list[str]:
    """A markdown table of an `rvhub eval --json` report: per task, accuracy ± stderr of target, +α·v, −α·v and
    the control, n, and the McNemar p-values of +α·v against target and against the control."""
    alpha = report["scale"]
    lines = [f"| task | n | target | +{alpha:g}·v | −{alpha:g}·v | control (+{alpha:g}·r) | "
             f"p (+v vs target) | p (+v vs control) |", "|---|---|---|---|---|---|---|---|"]
    for d in report["deltas"]:
        s, e = d["scores"], d.get("stderr") or {}
        tests = {t["against"]: t for t in d["tests"]}
        task = d["benchmark"] + (f" ({d['metric']})" if d["metric"] != "exact_match" else "")
        lines.append(
            f"| {task} | {d['n'] if d['n'] is not None else '–'} | {_fmt(s['target'], e.get('target'))} | "
            f"{_fmt(s['plus'], e.get('plus'))} | {_fmt(s.get('minus'), e.get('minus'))} | "
            f"{_fmt(s.get('control'), e.get('control'))} | {_p(tests.get('target', {}).get('p_value'))} | "
            f"{_p(tests.get('control', {}).get('p_value'))} |"
        )
    return lines


def verdict(report: dict[str, Any], alpha: float = ALPHA) -> list[str]:
    """One plain sentence per task: did +v beat target and the control at p < ``alpha``, did −v hurt?"""
    out = []
    for d in report["deltas"]:
        s = d["scores"]
        tests = {t["against"]: t for t in d["tests"]}
        parts = []
        for against, name in (("target", "target"), ("control", "the random control")):
            t = tests.get(against)
            if t is None:
                continue
            diff = s["plus"] - (s["target"] if against == "target" else s["control"])
            if t["p_value"] < alpha:
                word = "beats" if diff > 0 else "is worse than"
                parts.append(f"+v {word} {name} ({diff:+.3f}, p = {t['p_value']:.2g})")
            else:
                parts.append(f"+v is not distinguishable from {name} ({diff:+.3f}, p = {t['p_value']:.2g})")
        if s.get("minus") is not None:
            parts.append(f"−v moves the score by {s['minus'] - s['target']:+.3f} (rvhub eval runs no test on −v)")
        out.append(f"{d['benchmark']}: " + "; ".join(parts) + ".")
    shows = all(t["p_value"] < alpha and t["diff"] > 0 for d in report["deltas"] for t in d["tests"])
    out.append("The transfer shows on this run: +v beats both target and the control." if shows and report["deltas"]
               else "The transfer does not show on this run (not every test of +v is positive at p < "
               f"{alpha:g}); that is the result, not a failure of the demo.")
    return out


# ---------------------------------------------------------------- steps that load models


def regenerate(folder: Path, questions: Sequence[str]) -> list[str]:
    """Greedy answers of the model in ``folder``, one prompt at a time, in the lm-eval task's format (prompt
    ``Q: …\\nA:``, up to 48 new tokens, stop at a newline)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for q in questions:
            ids = tok(f"Q: {q}\nA:", return_tensors="pt", add_special_tokens=False)
            gen = model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0])
    return out


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def peft_check(target: Path, adapter: Path, merged_dir: Path) -> dict[str, Any]:
    """Load TARGET + the adapter with PEFT (float32), merge, and compare every weight with rvhub's float32
    application: the LoRA modules should agree to float32 rounding; rvhub also adds the exact residual (norms,
    embeddings), which PEFT cannot hold."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    peft_w = {k: v.detach() for k, v in merged.state_dict().items()}
    rv_w, tgt_w = _weights(merged_dir), _weights(target)
    lora, residual, max_diff = 0, 0, 0.0
    for name, w in rv_w.items():
        mine, base = peft_w[name].float(), tgt_w[name].float()
        if torch.equal(mine, base):  # PEFT left it alone: whatever rvhub added is the residual
            if not torch.equal(w.float(), base):
                residual += 1
            continue
        lora += 1
        max_diff = max(max_diff, float((mine - w.float()).abs().max()))
    return {"lora_tensors": lora, "residual_tensors": residual, "max_abs_diff": max_diff}


def _samples(run_dir: Path, task: str) -> dict[int, Sample]:
    return read_samples(run_dir / f"samples_{task}.jsonl")


# ---------------------------------------------------------------- the story


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=LIMIT, help="test problems per task (default %(default)s)")
    parser.add_argument("--rank", type=int, default=RANK, help="LoRA rank (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the family's seed")
    parser.add_argument("--batch-size", default="600", help="lm-eval batch size (default %(default)s)")
    parser.add_argument("--adversarial", action="store_true",
                        help=f"also evaluate {ADV_TASK} (the same problems with an irrelevant sentence; ~40%% longer)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes inside PEFT
    t0 = time.perf_counter()
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    os.environ.update(OFFLINE, HF_DATASETS_CACHE=str(ROOT / "hf-datasets"))  # lm-eval's datasets cache, too

    from rvhub.toy import build_family

    fam = build_family(ROOT / "family", args.seed)  # a copy of the cache entry, its task YAMLs written for it
    built = time.perf_counter() - t0
    print(f"  family in {fam.root}: base, sft, rl (= sft + GRPO), target (another instruction mix), other "
          f"({built:.0f}s)\n")

    vec, adapter, registry = ROOT / "vector", ROOT / "adapter", ROOT / "registry"
    ex = rvhub("extract", "--from", str(fam.sft), "--to", str(fam.rl), "-o", str(vec))
    print(f"  v = rl − sft: {ex['changed_elements']:,} of {ex['elements']:,} elements changed by GRPO "
          f"({100 * ex['changed_elements'] / max(ex['elements'], 1):.0f}%), {ex['vector_bytes']:,} B "
          f"({ex['vector_bytes'] / max(ex['model_bytes'], 1):.2f}x the model), exact: {ex['exact']}\n")

    rep = rvhub("compress", str(vec), "-o", str(adapter), "--rank", str(args.rank))["report"]
    print(f"  LoRA adapter: {len(rep['modules'])} modules at rank {args.rank}, {rep['adapter_params']:,} parameters; "
          f"of ‖v‖²: adapter {100 * rep['adapter_energy']:.1f}%, exact residual (embeddings, norms) "
          f"{100 * rep['residual_energy']:.1f}%, dropped {100 * rep['dropped_energy']:.1f}%\n")

    checks = {}
    for name in ("target", "other"):
        c = rvhub("check", str(adapter), "--base", str(getattr(fam, name)), check=False)
        checks[name] = c
        failed = [x["name"] for x in c["checks"] if x["status"] == "fail"]
        print(f"  check --base {name}: {c['status']}" + (f" (fails: {', '.join(failed)})" if failed else ""))
    print()

    eval_dir = ROOT / "eval"
    tasks = [TASK, ADV_TASK] if args.adversarial else [TASK]
    report = rvhub("eval", str(adapter), "--base", str(fam.target), "--tasks", ",".join(tasks),
                   "--include-path", str(fam.tasks), "--limit", str(args.limit), "--batch-size", args.batch_size,
                   "--dtype", "float32", "--output-dir", str(eval_dir))
    print(f"\nAccuracy on {report['deltas'][0]['n']} held-out test problems (lm-eval through rvhub eval, greedy, "
          f"exact match on the final answer; control: Gaussian noise with v's per-tensor norm, seed 0; "
          f"p: exact McNemar on the paired problems), {report['seconds']:.0f}s:\n")
    table = accuracy_table(report)
    print("\n".join(table) + "\n")
    for line in verdict(report):
        print("  " + line)
    print()

    rvhub("card", str(adapter), "--license", "apache-2.0", "--scale", "1")
    push = rvhub("push", str(adapter), REPO, "--registry", str(registry))
    print(f"  pushed to the local registry {registry}: commit {push['commit'][:12]}")
    found = rvhub("search", "--base", str(fam.target), "--registry", str(registry))
    print(f"  search --base target: {[h['repo_id'] for h in found['hits']]}")
    card = rvhub("info", REPO, "--registry", str(registry))["card"]
    print(f"  info: license {card.get('license')}, recommended α {card.get('recommended_scale')}, "
          f"{len(card.get('benchmarks', []))} benchmark deltas on the card, {len(card.get('files', []))} files\n")

    merged = ROOT / "merged"
    pulled = rvhub("pull", REPO, "--registry", str(registry), "--apply", "--base", str(fam.target), "-o", str(merged),
                   "--dtype", "float32")
    print(f"  pulled {pulled['repo_id']}@{pulled['commit'][:12]} (sha256 verified), applied to target → {merged} "
          "(float32: the weights of the eval's +v run)\n")

    plus_dir = next(p for p in sorted(eval_dir.iterdir()) if p.name.startswith("plus_"))
    chosen, total = wrong_to_right(_samples(eval_dir / "target", TASK), _samples(plus_dir, TASK), EXAMPLES)
    print(f"Test problems that target got wrong and target + v got right: {total} of {report['deltas'][0]['n']}"
          + (f"; the first {len(chosen)} (as lm-eval logged them, then the merged model from pull --apply):"
             if chosen else "; there is nothing to show."))
    again = regenerate(merged, [m.question for _, m in chosen]) if chosen else []
    for (t, m), re_gen in zip(chosen, again, strict=True):
        same = "(the same)" if re_gen.strip() == m.response.strip() else "(differs from the eval's log)"
        print(f"\n  Q: {m.question}  [answer {m.answer}]\n  target:       {t.response.strip()}\n"
              f"  target + v:   {m.response.strip()}\n  merged model: {re_gen.strip()} {same}")
    print()

    pc = peft_check(fam.target, Path(pulled["path"]), merged)
    print(f"  PEFT: target + the pulled adapter (PeftModel.from_pretrained, merge_and_unload, float32) against "
          f"the merged model: {pc['lora_tensors']} LoRA-module weights agree to "
          f"{pc['max_abs_diff']:.1e} (max abs); rvhub also adds the exact residual to {pc['residual_tensors']} "
          f"tensors ({100 * rep['residual_energy']:.1f}% of ‖v‖²), which PEFT cannot hold")
    same_tok = (merged / "tokenizer.json").read_bytes() == (fam.target / "tokenizer.json").read_bytes()
    print(f"  merged model's tokenizer and chat template are target's: {same_tok}")
    print(f"\nall outputs in {ROOT}; {time.perf_counter() - t0:.0f}s ({time.perf_counter() - t0 - built:.0f}s "
          "after the family)")
    ok = (ex["exact"] and checks["target"]["ok"] and not checks["other"]["ok"] and found["hits"]
          and pc["max_abs_diff"] < 1e-4 and same_tok)
    if not ok:
        sys.exit("demo check failed")


if __name__ == "__main__":
    main()

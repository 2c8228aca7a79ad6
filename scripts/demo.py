"""The main job end to end, offline, on an embedded default: a tiny SFT/RL/TARGET trio built in code.

extract v = RL − SFT (exact) → compress to a LoRA adapter → card (license, α, a toy benchmark delta) → push to
a local registry folder → search and info → pull --apply onto TARGET → load the result with transformers and
the adapter with PEFT → report what changed. Run with `make demo`; output goes to demo-out/ (rebuilt each run).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rvhub.toy import Trio, add_noise, build_model, plant_lowrank_delta, plant_sparse_delta, save_tokenizer

ROOT = Path(__file__).resolve().parent.parent / "demo-out"
REGISTRY = ROOT / "registry"
REPO = "demo/toy-reasoning-vector"
PROMPTS = 64  # random token sequences for the toy benchmark


def rvhub(*args: str, quiet: bool = True) -> Any:
    cmd = [sys.executable, "-m", "rvhub", *args, "--json", *(["--quiet"] if quiet else [])]
    print("$ rvhub " + shlex.join(args))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"rvhub failed:\n{done.stderr}")
    return json.loads(done.stdout)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def build() -> Trio:
    """bf16 Qwen2-style (tied) SFT; RL = SFT + sparse bf16 changes + a rank-4 update of every linear weight;
    TARGET = a noisy sibling of SFT with its own tokenizer tag and generation settings."""
    models = ROOT / "models"
    sft = build_model(models / "sft", "qwen2", hidden=64, tokenizer_tag="sft")
    sparse = plant_sparse_delta(sft, models / "rl-sparse", fraction=0.05, skip=("norm", "bias", "embed"))
    rl = plant_lowrank_delta(sparse, models / "rl", rank=4, seed=3)
    shutil.rmtree(sparse)
    save_tokenizer(rl, "rl")
    target = add_noise(sft, models / "target", seed=2)
    save_tokenizer(target, "target")
    return Trio(sft, rl, target)


def logits(path: Path, ids: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        model.load_adapter(str(adapter))  # transformers' PEFT integration
    with torch.no_grad():
        return model(input_ids=ids).logits


def closeness(got: torch.Tensor, want: torch.Tensor) -> float:
    return 1 - float((got - want).norm() / want.norm())


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    shutil.rmtree(ROOT, ignore_errors=True)
    trio = build()
    print(f"built a tiny tied Qwen2-style trio in {ROOT / 'models'}: SFT, RL = SFT + sparse + rank-4 delta, TARGET\n")

    ex = rvhub("extract", "--from", str(trio.sft), "--to", str(trio.rl), "-o", str(ROOT / "vector"))
    print(f"  {ex['changed_elements']:,} of {ex['elements']:,} elements changed, vector "
          f"{ex['vector_bytes']:,} B = {ex['vector_bytes'] / ex['model_bytes']:.2f}x the model (the planted low-rank "
          "update moves every element of its matrices; RL updates leave most bf16 elements as they were), exact")
    rvhub("apply", str(ROOT / "vector"), "--base", str(trio.sft), "-o", str(ROOT / "sft+v"))
    rl, back = tensors(trio.rl), tensors(ROOT / "sft+v")
    exact = rl.keys() == back.keys() and all(torch.equal(rl[k].view(torch.int16), back[k].view(torch.int16))
                                             for k in rl)
    print(f"  SFT + v == RL bit for bit: {exact}\n")

    rep = rvhub("compress", str(ROOT / "vector"), "-o", str(ROOT / "adapter"), "--rank", "4")["report"]
    print(f"  LoRA adapter: {len(rep['modules'])} modules at rank 4, {rep['adapter_params']:,} parameters; of ‖v‖²: "
          f"adapter {100 * rep['adapter_energy']:.1f}%, residual {100 * rep['residual_energy']:.1f}% (exact), "
          f"dropped {100 * rep['dropped_energy']:.1f}%; relative error {rep['rel_error']:.3f}\n")

    # a toy benchmark: how close the target's logits come to RL's (1 − relative distance), alone and with ±v
    ids = torch.randint(0, 100, (PROMPTS, 12), generator=torch.Generator().manual_seed(0))
    want = logits(trio.rl, ids)
    scores = {"target": closeness(logits(trio.target, ids), want)}
    for name, alpha in (("plus", "1"), ("minus", "-1")):
        rvhub("apply", str(ROOT / "adapter"), "--base", str(trio.target), "-o", str(ROOT / f"target-{name}"),
              "--scale", alpha, "--dtype", "float32")
        scores[name] = closeness(logits(ROOT / f"target-{name}", ids), want)
    rvhub("card", str(ROOT / "adapter"), "--license", "apache-2.0", "--scale", "1", "--benchmark", "toy-closeness",
          "--metric", "logit_closeness_to_rl", "--target", "demo/target", "--score-target",
          f"{scores['target']:.4f}", "--score-plus", f"{scores['plus']:.4f}", "--score-minus",
          f"{scores['minus']:.4f}", "--n", str(PROMPTS), "--num-fewshot", "0", "--no-chat-template", quiet=False)
    print(f"  toy benchmark (closeness of logits to RL's on {PROMPTS} random sequences; 1 = equal): target "
          f"{scores['target']:.4f}, +v {scores['plus']:.4f}, −v {scores['minus']:.4f}\n")

    push = rvhub("push", str(ROOT / "adapter"), REPO, "--registry", str(REGISTRY))
    again = rvhub("push", str(ROOT / "adapter"), REPO, "--registry", str(REGISTRY))
    print(f"  pushed to {REGISTRY}: commit {push['commit'][:12]}; pushed again: new commit = {again['committed']}")
    found = rvhub("search", "--base", str(trio.target), "--registry", str(REGISTRY), quiet=False)
    fit = found["hits"][0]["fit"] if found["hits"] else {"reason": "none found", "lineage": None}
    print(f"  search --base TARGET: {[h['repo_id'] for h in found['hits']]} ({fit['lineage']})")
    check = rvhub("check", str(ROOT / "adapter"), "--base", str(trio.target), quiet=False)
    print("  check: " + ", ".join(f"{c['name']} {c['status']}" for c in check["checks"]) + "\n")

    pulled = rvhub("pull", REPO, "--registry", str(REGISTRY), "--apply", "--base", str(trio.target),
                   "-o", str(ROOT / "merged"), "--dtype", "float32")
    print(f"  pulled {pulled['repo_id']}@{pulled['commit'][:12]}, sha256 verified, applied to TARGET (float32 out)\n")

    merged = logits(ROOT / "merged", ids)
    peft = logits(trio.target, ids, adapter=Path(pulled["path"]))
    plain = logits(trio.target, ids)
    moved = float((merged - plain).norm() / plain.norm())
    agree = float((peft - merged).norm() / merged.norm())
    print(f"  merged model loads with transformers; logits moved {moved:.4f} (relative) from TARGET's")
    print(f"  TARGET + the pulled adapter through transformers/PEFT vs the merged model: relative difference "
          f"{agree:.1e} (the residual holds {100 * rep['residual_energy']:.2f}% of ‖v‖², which PEFT does not load)")
    same_tok = (ROOT / "merged" / "tokenizer.json").read_bytes() == (trio.target / "tokenizer.json").read_bytes()
    print(f"  tokenizer and config taken from TARGET: {same_tok}")
    print(f"\nall outputs in {ROOT}; {time.perf_counter() - t0:.0f}s")
    moves_toward_rl = scores["plus"] > scores["target"] > scores["minus"]
    if not (exact and same_tok and not again["committed"] and found["hits"] and agree < 1e-4 and moves_toward_rl):
        sys.exit("demo check failed")


if __name__ == "__main__":
    main()

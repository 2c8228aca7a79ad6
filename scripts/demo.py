"""The main job end to end, offline, on an embedded default: a tiny SFT/RL/TARGET trio built in code.

extract v = RL − SFT → apply TARGET + v and TARGET − v → check exactness → load with transformers → report.
Run with `make demo`. Output goes to demo-out/ (rebuilt on every run).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rvhub.toy import build_trio

ROOT = Path(__file__).resolve().parent.parent / "demo-out"


def rvhub(*args: str) -> dict:
    cmd = [sys.executable, "-m", "rvhub", *args, "--quiet", "--json"]
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


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    trio = build_trio(ROOT / "models", "qwen2", hidden=64, adversarial=2)
    print(f"built a tiny tied Qwen2-style trio in {ROOT / 'models'} (SFT, RL = SFT + sparse delta, TARGET)\n")

    ex = rvhub("extract", "--from", str(trio.sft), "--to", str(trio.rl), "-o", str(ROOT / "vector"))
    print(f"  {ex['changed_elements']:,} of {ex['elements']:,} elements changed "
          f"({100 * ex['changed_elements'] / ex['elements']:.1f}%), {ex['unchanged_tensors']} tensors unchanged, "
          f"vector {ex['vector_bytes']:,} B = {ex['vector_bytes'] / ex['model_bytes']:.2f}x the model, "
          f"{ex['fixups']} float32 fix-ups keep it exact\n")

    rvhub("apply", str(ROOT / "vector"), "--base", str(trio.sft), "-o", str(ROOT / "sft+v"))
    rl, back = tensors(trio.rl), tensors(ROOT / "sft+v")
    exact = all(torch.equal(rl[k].view(torch.int16), back[k].view(torch.int16)) for k in rl)
    print(f"  SFT + v == RL bit for bit: {exact}\n")

    for alpha, name in (("1", "target+v"), ("-1", "target-v")):
        rvhub("apply", str(ROOT / "vector"), "--base", str(trio.target), "-o", str(ROOT / name), "--scale", alpha)
    print()

    tok = AutoTokenizer.from_pretrained(ROOT / "target+v")
    ids = tok("two plus three is five", return_tensors="pt").input_ids
    logits = {}
    for name in ("target", "target+v", "target-v"):
        path = trio.target if name == "target" else ROOT / name
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            logits[name] = model(ids).logits
    base = logits["target"]
    for name in ("target+v", "target-v"):
        diff = (logits[name] - base).abs().max().item()
        print(f"  {name}: loads with transformers, max |Δlogit| vs target = {diff:.4f}")
    same_tok = (ROOT / "target+v" / "tokenizer.json").read_bytes() == (trio.target / "tokenizer.json").read_bytes()
    print(f"  tokenizer and config taken from TARGET: {same_tok}")
    print(f"\nall outputs in {ROOT}")
    if not exact or not same_tok:
        sys.exit("demo check failed")


if __name__ == "__main__":
    main()

"""Does ``target + (rl − sft)`` solve more toy problems than ``target`` and a norm-matched random control?

A small greedy-decoding accuracy function (for tuning the recipe on the validation split without lm-eval), the
in-memory sums (float32, rounded once to the model's bf16, as ``rvhub apply`` computes them), the authors'
control (per tensor, Gaussian noise rescaled to that tensor's ‖v‖₂) and an exact McNemar test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rvhub.toy import tasks

if TYPE_CHECKING:
    import torch

    from rvhub.toy.family import FamilyPaths


@dataclass(frozen=True)
class Score:
    """Per-problem outcomes of one model on one task."""

    name: str
    task: str
    correct: tuple[bool, ...]

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def acc(self) -> float:
        return sum(self.correct) / self.n

    @property
    def stderr(self) -> float:
        return math.sqrt(self.acc * (1 - self.acc) / max(1, self.n - 1))


def mcnemar(a: Iterable[bool], b: Iterable[bool]) -> float:
    """Exact two-sided McNemar p-value of paired 0/1 outcomes (rvhub eval's own test)."""
    from .._stats import mcnemar as paired

    return paired([float(x) for x in a], [float(y) for y in b]).p_value


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def vector(paths: FamilyPaths) -> dict[str, torch.Tensor]:
    """v = rl − sft in float32 (exact for bf16 weights that are close, as rvhub extract stores them)."""
    rl, sft = load_state(paths.rl), load_state(paths.sft)
    return {k: rl[k].float() - sft[k].float() for k in sorted(rl)}


def gaussian_control(v: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Per tensor, N(0, 1) noise rescaled to that tensor's ‖v‖₂ (zero where v is zero)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in v.items():
        r = torch.randn(t.shape, generator=g)
        out[k] = r * (t.norm() / r.norm())
    return out


def added(base: dict[str, torch.Tensor], v: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """``base + scale·v`` computed in float32, rounded once to each tensor's dtype."""
    return {k: (t.float() + scale * v[k]).to(t.dtype) if k in v else t for k, t in base.items()}


def accuracy(folder: Path, probs: list[tasks.Problem], *, adversarial: bool = False,
             state: dict[str, torch.Tensor] | None = None, batch: int = 100, name: str = "") -> Score:
    """Greedy decoding (up to 40 new tokens) of each prompt; correct when the parsed final answer matches.

    ``state`` replaces the folder's weights (a sum computed in memory); the config and tokenizer stay the
    folder's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if state is not None:
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    model.float().eval()  # type: ignore[no-untyped-call]  # bf16 weights evaluated in float32: CPU bf16 matmuls are slow
    out: list[bool] = []
    with torch.no_grad():
        for i in range(0, len(probs), batch):
            chunk = probs[i: i + batch]
            enc = tok([p.prompt(adversarial) for p in chunk], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [tasks.parse_answer(t.split("\n")[0]) == p.answer for t, p in zip(texts, chunk, strict=True)]
    return Score(name or folder.name, "adv" if adversarial else "plain", tuple(out))


def evidence(paths: FamilyPaths, split: tasks.Split = "validation", scale: float = 1.0,
             n: int | None = None) -> list[Score]:
    """Scores of base, sft, rl, target, target ± scale·v, target + control and base + v on ``split``."""
    probs = tasks.problems(split, n)
    v = vector(paths)
    r = gaussian_control(v)
    target, base = load_state(paths.target), load_state(paths.base)
    runs: list[tuple[str, Path, dict[str, torch.Tensor] | None]] = [
        ("base", paths.base, None), ("sft", paths.sft, None), ("rl", paths.rl, None),
        ("target", paths.target, None), (f"target+{scale:g}v", paths.target, added(target, v, scale)),
        (f"target-{scale:g}v", paths.target, added(target, v, -scale)),
        (f"target+{scale:g}control", paths.target, added(target, r, scale)),
        (f"base+{scale:g}v", paths.base, added(base, v, scale)),
    ]
    return [accuracy(folder, probs, adversarial=adv, state=state, name=name)
            for adv in (False, True) for name, folder, state in runs]


def table(scores: list[Score]) -> str:
    """A markdown table: accuracy ± stderr, n, and McNemar p against target and against the control."""
    by = {(s.name, s.task): s for s in scores}
    lines = ["| model | task | accuracy | ± stderr | n | p vs target | p vs control |", "|---|---|---|---|---|---|---|"]
    for s in scores:
        tgt = by.get(("target", s.task))
        ctl = next((x for (nm, t), x in by.items() if t == s.task and "control" in nm), None)
        p_t = f"{mcnemar(s.correct, tgt.correct):.2g}" if tgt and s.name.startswith("target") and s is not tgt else ""
        p_c = f"{mcnemar(s.correct, ctl.correct):.2g}" if ctl and s.name.startswith("target+") and s is not ctl \
            else ""
        lines.append(f"| {s.name} | {s.task} | {s.acc:.3f} | {s.stderr:.3f} | {s.n} | {p_t} | {p_c} |")
    return "\n".join(lines)

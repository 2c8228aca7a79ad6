"""Does ``target + (rl − sft)`` solve more toy problems than ``target`` and a norm-matched random control?

A small greedy-decoding accuracy function (for tuning the recipe on the validation split without lm-eval) on
models that take a vector in memory through :mod:`rvhub.inmemory` (``add_vector``: float32 arithmetic rounded
once to the model's bf16, what ``rvhub apply`` writes) and its Gaussian control (``Control``: per tensor,
Gaussian noise rescaled to that tensor's ‖v‖₂, the authors' construction). The vector is ``rvhub extract``'s
exact one; p-values are rvhub eval's McNemar (:mod:`rvhub._stats`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rvhub.toy import tasks

if TYPE_CHECKING:
    from rvhub.inmemory import Deltas
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


def extract_vector(paths: FamilyPaths, out: Path) -> Deltas:
    """``rvhub extract --from sft --to rl`` into ``out`` (exact, sparse), opened."""
    from rvhub.extract import extract
    from rvhub.formats import open_vector

    extract(str(paths.sft), str(paths.rl), out, progress=False)
    return open_vector(out)


def control(vec: Deltas, seed: int = 0) -> Deltas:
    """The Gaussian control of ``vec`` (rvhub eval's): per tensor, N(0, 1) noise rescaled to ‖v_t‖₂."""
    from rvhub.inmemory import Control

    return Control(vec, "gaussian", seed)


def load(folder: Path, deltas: Deltas | None = None, scale: float = 1.0) -> Any:
    """The bf16 model of ``folder``, plus ``scale``·``deltas`` added in memory (rvhub.inmemory.add_vector)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if deltas is not None:
        from rvhub.inmemory import add_vector

        add_vector(model, deltas, scale)
    return model


def accuracy(folder: Path, probs: list[tasks.Problem], *, adversarial: bool = False, deltas: Deltas | None = None,
             scale: float = 1.0, batch: int = 100, name: str = "") -> Score:
    """Greedy decoding (up to 40 new tokens) of each prompt; correct when the parsed final answer matches.

    ``deltas`` (a vector or a control) is added to the folder's weights first, ``scale`` times."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = load(folder, deltas, scale)
    model.float().eval()  # the bf16 sums evaluated in float32: CPU bf16 matmuls are slow
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
             n: int | None = None, ranks: tuple[int, ...] = ()) -> list[Score]:
    """Scores of base, sft, rl, target, target ± scale·v, target + control and base + v on ``split``; with
    ``ranks``, also target + the LoRA form of v at each rank (``rvhub compress --rank R``: the linear layers'
    deltas as an adapter, the rest, tied embeddings included, in its exact residual)."""
    from rvhub.compress import compress
    from rvhub.formats import open_vector

    probs = tasks.problems(split, n)
    with tempfile.TemporaryDirectory(prefix="rvhub-toy-v-") as tmp:
        v = extract_vector(paths, Path(tmp) / "v")
        r = control(v)
        runs: list[tuple[str, Path, Deltas | None, float]] = [
            ("base", paths.base, None, 1.0), ("sft", paths.sft, None, 1.0), ("rl", paths.rl, None, 1.0),
            ("target", paths.target, None, 1.0), (f"target+{scale:g}v", paths.target, v, scale),
            (f"target-{scale:g}v", paths.target, v, -scale), (f"target+{scale:g}control", paths.target, r, scale),
            (f"base+{scale:g}v", paths.base, v, scale),
        ]
        for rank in ranks:
            compress(Path(tmp) / "v", Path(tmp) / f"lora{rank}", rank=rank, progress=False)
            runs.append((f"target+{scale:g}lora{rank}", paths.target, open_vector(Path(tmp) / f"lora{rank}"), scale))
        return [accuracy(folder, probs, adversarial=adv, deltas=d, scale=a, name=name)
                for adv in (False, True) for name, folder, d, a in runs]


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

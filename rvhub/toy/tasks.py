"""The toy family's task: short arithmetic word problems, their splits, and the lm-eval task folder.

A problem is a start count and one or two changes ("Ann has 7 apples. She buys 5 more apples. …"). The worked
solution writes each step as an equation and ends in a fixed format, ``The answer is N.``; the adversarial form
of the same problem adds a sentence with an irrelevant number. Splits are disjoint by question text: ``train``
(SFT and GRPO), ``validation`` (recipe tuning) and ``test`` (reported once).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "validation", "test"]
ANSWER_RE = re.compile(r"The answer is (-?\d+)")
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# One turn of the chat template is "Q: …\nA: …<eos>"; the task prompt is exactly the rendered user turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }}" + EOS + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
NAMES = ["Ann", "Ben", "Cat", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo"]
ITEMS = ["apples", "books", "coins", "cards", "eggs", "pens", "shells", "stamps"]
_PLUS = ["She buys {n} more {item}.", "She finds {n} more {item}.", "She gets {n} more {item}."]
_MINUS = ["She gives {n} {item} away.", "She loses {n} {item}.", "She sells {n} {item}."]
_NOISE = [
    "{other} has {n} {item2}.", "It is {n} degrees outside.", "The shop opens at {n}.",
    "{other} is {n} years old.",
]
SPLIT_SIZES: dict[Split, int] = {"validation": 300, "test": 600}


@dataclass(frozen=True)
class Problem:
    """One word problem with its answer, worked solution and adversarial variant."""

    question: str
    solution: str
    answer: int
    adversarial: str

    def prompt(self, adversarial: bool = False) -> str:
        return f"Q: {self.adversarial if adversarial else self.question}\nA:"


def make_problem(rng: random.Random) -> Problem:
    """A random problem: start 2–9, one or two changes of 1–5, never below zero."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 9)
    sentences = [f"{name} has {total} {item}."]
    steps = []
    for _ in range(rng.choice((1, 2))):
        n = rng.randint(1, 5)
        if rng.random() < 0.5 or n > total:
            sentences.append(rng.choice(_PLUS).format(n=n, item=item))
            steps.append(f"{total} + {n} = {total + n}.")
            total += n
        else:
            sentences.append(rng.choice(_MINUS).format(n=n, item=item))
            steps.append(f"{total} - {n} = {total - n}.")
            total -= n
    ask = f"How many {item} does {name} have now?"
    other = rng.choice([x for x in NAMES if x != name])
    noise = rng.choice(_NOISE).format(other=other, n=rng.randint(1, 30), item2=rng.choice(ITEMS))
    adv = list(sentences)
    adv.insert(rng.randint(1, len(adv)), noise)
    solution = " ".join(steps) + f" The answer is {total}."
    return Problem(" ".join(sentences + [ask]), solution, total, " ".join(adv + [ask]))


def _split_of(question: str) -> Split:
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big") % 10
    return "test" if h < 2 else "validation" if h < 3 else "train"


def problems(split: Split, n: int | None = None, *, seed: int = 0) -> list[Problem]:
    """The first ``n`` distinct problems of ``split`` (validation/test default to their fixed sizes).

    Which split a question belongs to depends only on its text, so the splits never share a question whatever
    seed or size is asked for; validation and test ignore ``seed`` (they are the same for every family)."""
    want = n if n is not None else SPLIT_SIZES.get(split, 2000)
    rng = random.Random(f"rvhub-toy-{split}-{seed if split == 'train' else 0}")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < want:
        p = make_problem(rng)
        if p.question in seen or _split_of(p.question) != split:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def parse_answer(text: str) -> int | None:
    """The number after the first ``The answer is``, or None."""
    m = ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "Q: {{{{{field}}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
generation_kwargs:
  until: ["\\n", "{eos}"]
  do_sample: false
  max_gen_toks: 48
filter_list:
  - name: final-answer
    filter:
      - function: regex
        regex_pattern: "The answer is (-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(root: Path, test: list[Problem] | None = None, validation: list[Problem] | None = None, *,
                final: Path | None = None) -> Path:
    """Write ``root`` with JSONL data and lm-eval YAMLs: ``rvhub_toy``, ``rvhub_toy_adv`` (test split) and
    ``rvhub_toy_val``, ``rvhub_toy_val_adv`` (validation split, for tuning). The YAMLs name their data files by
    absolute path, under ``final`` when ``root`` is a temporary folder that will be renamed to ``final``."""
    root.mkdir(parents=True, exist_ok=True)
    where = (final or root).resolve()
    for split, probs in (("test", test or problems("test")), ("validation", validation or problems("validation"))):
        rows = [{"question": p.question, "adversarial": p.adversarial, "answer": str(p.answer),
                 "solution": p.solution} for p in probs]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        suffix = "" if split == "test" else "_val"
        for field, adv in (("question", ""), ("adversarial", "_adv")):
            task = f"rvhub_toy{suffix}{adv}"
            data = str(where / f"{split}.jsonl")
            (root / f"{task}.yaml").write_text(_YAML.format(task=task, data=data, field=field, eos=EOS))
    return root

"""A tiny TRAINED trio for `rvhub eval`: RL = SFT fine-tuned for a few seconds on a toy yes/no task, so v is a
learned skill; a local lm-eval task (YAML over JSONL) that measures it."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rvhub.toy import add_noise, build_model, rewrite_weights, to_float32

TASK = "rvhub_toy_yesno"
_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "two", "plus", "three", "five", "four",
          "twenty", "models", "vectors"]
CHOICES = ["yes", "no"]


@dataclass(frozen=True)
class Trained:
    sft: Path
    rl: Path
    target: Path
    tasks: Path  # --include-path
    docs: list[dict[str, object]]


def toy_docs(n: int = 40, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    docs: list[dict[str, object]] = []
    seen = set()
    while len(docs) < n:
        words = tuple(rng.sample(_WORDS, 3))
        if words in seen:
            continue
        seen.add(words)
        docs.append({"text": " ".join(words) + " ?", "label": rng.randint(0, 1)})
    return docs


def write_task(folder: Path, docs: list[dict[str, object]], name: str = TASK) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {json.dumps(str(data))}\n"
        "test_split: train\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{text}}"\n'
        f"doc_to_choice: {json.dumps(CHOICES)}\n"
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


def _batch(tok, docs):  # type: ignore[no-untyped-def]
    """Token ids of context + " choice" for every doc and choice, the continuation split off as lm-eval does."""
    seqs, conts = [], []
    for d in docs:
        ctx = tok(d["text"], add_special_tokens=False).input_ids
        for c in CHOICES:
            whole = tok(d["text"] + " " + c, add_special_tokens=False).input_ids
            seqs.append(whole)
            conts.append(len(whole) - len(ctx))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    cont_mask = torch.zeros(len(seqs), width - 1)
    for i, (s, k) in enumerate(zip(seqs, conts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        cont_mask[i, len(s) - 1 - k : len(s) - 1] = 1  # positions predicting the continuation tokens
    return ids, mask, cont_mask


def train(sft: Path, rl: Path, docs: list[dict[str, object]], steps: int = 120, lr: float = 3e-3) -> float:
    """RL = SFT trained to pick the right choice (a softmax over the two choices' log-likelihoods)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(sft))
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
    ids, mask, cont = _batch(tok, docs)
    labels = torch.tensor([int(d["label"]) for d in docs])  # type: ignore[call-overload]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    acc = 0.0
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        ll = (lp * cont).sum(-1).reshape(len(docs), len(CHOICES))
        loss = torch.nn.functional.cross_entropy(ll, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = float((ll.argmax(-1) == labels).float().mean())
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    rewrite_weights(sft, rl, {})
    save_file(state, str(rl / "model.safetensors"), metadata={"format": "pt"})
    return acc


def build_trained(root: Path, docs: list[dict[str, object]] | None = None) -> Trained:
    root.mkdir(parents=True, exist_ok=True)
    docs = docs or toy_docs()
    sft = to_float32(build_model(root / "bf16", "qwen2", seed=7, hidden=64, vocab=128), root / "sft")
    acc = train(sft, root / "rl", docs)
    assert acc == 1.0, f"the fixture did not learn its task (train accuracy {acc})"
    target = add_noise(sft, root / "target", std=1e-3, seed=8)
    return Trained(sft, root / "rl", target, write_task(root / "tasks", docs), docs)

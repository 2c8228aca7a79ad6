"""The trained toy family: base, sft, rl (GRPO), target and other, built here on CPU and cached.

- base: a small Qwen2-style LM pretrained on synthetic text (word problems with bare answers, equations,
  counting and other patterned lines).
- sft: base fine-tuned on worked solutions of the word problems.
- rl: sft trained further with TRL's ``GRPOTrainer`` on the same problems (correctness reward plus a small
  format reward), so that ``rl − sft`` is what GRPO added, as in the paper's pair.
- target: base fine-tuned on a different instruction mix in the chat format (counting, comparing, bare
  arithmetic with worked steps, and 20 % word problems worked out): "the instruct model" of the lineage.
- other: the same architecture pretrained from another seed (the lineage check refuses it).

Training runs in float32; the folders hold bf16 weights. A build is cached under the user cache folder
(``RVHUB_CACHE`` overrides it) by a hash of its recipe, its seed and the library versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from rvhub._io import atomic_dir
from rvhub.errors import MissingExtraError
from rvhub.toy import tasks

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

log = logging.getLogger(__name__)
BUILD_VERSION = 2  # bump when the build code changes what a recipe produces
MEMBERS = ("base", "sft", "rl", "target", "other")


class Recipe(BaseModel):
    """Everything that decides the family's weights (with the seed and the library versions)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    vocab_size: int = Field(default=600, description="BPE vocabulary size of the locally trained tokenizer")
    hidden: int = Field(default=96, description="hidden size")
    layers: int = Field(default=2, description="decoder layers")
    heads: int = Field(default=4, description="attention heads (2 key/value heads)")
    pretrain_steps: int = Field(default=400, description="optimizer steps of pretraining (base)")
    other_steps: int = Field(default=60, description="optimizer steps of pretraining other (only its lineage matters)")
    pretrain_lr: float = Field(default=3e-3, description="peak AdamW learning rate of pretraining")
    sft_steps: int = Field(default=60, description="steps of SFT on worked solutions")
    target_steps: int = Field(default=100, description="steps of instruction tuning for target")
    finetune_lr: float = Field(default=2e-3, description="peak learning rate of sft and target")
    batch: int = Field(default=32, description="sequences per optimizer step (pretraining and SFT)")
    grpo_steps: int = Field(default=40, description="GRPOTrainer optimizer steps")
    grpo_lr: float = Field(default=1e-4, description="GRPO learning rate")
    grpo_generations: int = Field(default=8, description="completions per prompt (num_generations)")
    grpo_batch: int = Field(default=128, description="completions per step (a multiple of grpo_generations)")
    grpo_beta: float = Field(default=0.0, description="KL coefficient (0: no reference model, TRL's default)")
    format_reward: float = Field(default=0.1, description="reward for a completion that ends in 'The answer is N.'")
    train_problems: int = Field(default=3000, description="distinct training problems (train split)")
    grpo_adversarial: float = Field(default=0.5, description="share of GRPO prompts with an irrelevant sentence")
    grpo_temperature: float = Field(default=0.7, description="sampling temperature of GRPO's completions")
    target_word_problems: float = Field(
        default=0.2, description="share of target's instruction mix that are word problems worked out (chat format)")


DEFAULT = Recipe()
TINY = Recipe(vocab_size=200, hidden=32, layers=1, heads=2, pretrain_steps=12, other_steps=6, sft_steps=4,
              target_steps=4, batch=16, grpo_steps=2, grpo_batch=16, train_problems=200)
RECIPES = {"default": DEFAULT, "tiny": TINY}


@dataclass(frozen=True)
class FamilyPaths:
    """The folders of a built family."""

    root: Path
    base: Path
    sft: Path
    rl: Path
    target: Path
    other: Path
    tasks: Path
    key: str

    @classmethod
    def at(cls, root: Path, key: str) -> FamilyPaths:
        return cls(root, root / "base", root / "sft", root / "rl", root / "target", root / "other", root / "tasks",
                   key)


def cache_root() -> Path:
    """``RVHUB_CACHE``, else ``$XDG_CACHE_HOME/rvhub`` (``~/.cache/rvhub``)."""
    env = os.environ.get("RVHUB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rvhub"


def recipe_key(recipe: Recipe, seed: int) -> str:
    """The cache key: a hash of the recipe, the seed, the build version and the training libraries' versions."""
    import torch
    import transformers

    trl_version = _trl().__version__
    blob = json.dumps({"recipe": recipe.model_dump(), "seed": seed, "build": BUILD_VERSION, "torch": torch.__version__,
                       "transformers": transformers.__version__, "trl": trl_version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _trl() -> Any:
    try:
        import trl
    except ImportError as e:
        raise MissingExtraError("the toy family's training", "toy", "trl (TRL's GRPOTrainer)") from e
    return trl


def build_family(out: Path | None, seed: int = 0, recipe: Recipe = DEFAULT, *,
                 progress: Callable[[str], None] | None = print) -> FamilyPaths:
    """Build (or reuse from the cache) the family for ``recipe`` and ``seed``; copy it to ``out`` if given.

    ``out`` gets ``base, sft, rl, target, other`` (save_pretrained folders) and ``tasks/`` (lm-eval YAMLs over
    the test and validation JSONL files, written for that folder). Without ``out`` the cache entry is returned.
    """
    say = progress or (lambda _msg: None)
    key = recipe_key(recipe, seed)
    entry = cache_root() / "toy-family" / key
    if (entry / "recipe.json").is_file():
        say(f"toy family {key}: cached in {entry}")
    else:
        say(f"toy family {key}: building in {entry} (recipe {recipe.model_dump()})")
        with atomic_dir(entry, overwrite=True) as tmp:
            _build(tmp, seed, recipe, say)
            tasks.write_tasks(tmp / "tasks", final=entry / "tasks")
            (tmp / "recipe.json").write_text(json.dumps({"seed": seed, "key": key, **recipe.model_dump()}, indent=2))
    if out is None:
        return FamilyPaths.at(entry, key)
    with atomic_dir(Path(out), overwrite=True) as tmp:
        for m in MEMBERS:
            shutil.copytree(entry / m, tmp / m)
        shutil.copy2(entry / "recipe.json", tmp / "recipe.json")
        tasks.write_tasks(tmp / "tasks", final=Path(out) / "tasks")
    say(f"toy family written to {out}")
    return FamilyPaths.at(Path(out), key)


# ---------------------------------------------------------------------------------------------- corpora


def _pretrain_docs(rng: random.Random, train: list[tasks.Problem]) -> list[str]:
    """Word problems (60 % with bare answers, 40 % worked out), equations, counting and sentences: the base's
    'web text'."""
    docs = []
    for p in train:
        answer = p.solution if rng.random() < 0.4 else f"The answer is {p.answer}."
        docs.append(f"{p.prompt()} {answer}{tasks.EOS}")
    for _ in range(len(train)):
        kind = rng.random()
        if kind < 0.5:
            eqs = []
            for _ in range(rng.randint(2, 4)):
                a, b = rng.randint(0, 14), rng.randint(1, 5)
                eqs.append(f"{a} + {b} = {a + b}." if rng.random() < 0.5 or b > a else f"{a} - {b} = {a - b}.")
            docs.append(" ".join(eqs) + tasks.EOS)
        elif kind < 0.75:
            s = rng.randint(0, 20)
            docs.append(" ".join(str(i) for i in range(s, s + rng.randint(3, 8))) + "." + tasks.EOS)
        else:
            name, item = rng.choice(tasks.NAMES), rng.choice(tasks.ITEMS)
            docs.append(f"{name} likes {item}. {rng.choice(tasks.NAMES)} has a box of {item}.{tasks.EOS}")
    rng.shuffle(docs)
    return docs


def _instruction_pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """The target's instruction mix (not word problems): successor, larger of two, bare arithmetic worked out."""
    pairs = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.15:
            a = rng.randint(0, 30)
            pairs.append((f"What number comes after {a}?", f"The answer is {a + 1}."))
        elif kind < 0.3:
            a, b = rng.sample(range(0, 30), 2)
            pairs.append((f"Which is larger, {a} or {b}?", f"The answer is {max(a, b)}."))
        else:
            a, b, c = rng.randint(2, 12), rng.randint(1, 9), rng.randint(1, 9)
            s = a + b
            if rng.random() < 0.5 and c <= s:
                pairs.append((f"What is {a} + {b} - {c}?", f"{a} + {b} = {s}. {s} - {c} = {s - c}. "
                              f"The answer is {s - c}."))
            else:
                pairs.append((f"What is {a} + {b} + {c}?", f"{a} + {b} = {s}. {s} + {c} = {s + c}. "
                              f"The answer is {s + c}."))
    return pairs


def _target_mix(rng: random.Random, instr: list[tuple[str, str]], train: list[tasks.Problem],
                share: float) -> list[tuple[str, str]]:
    """``instr`` with ``share`` of its pairs replaced by train word problems worked out (question, solution).

    A separate generator, and the tokenizer's corpus is left as it was: the base does not depend on ``share``."""
    out = list(instr)
    for i in range(len(out)):
        if rng.random() < share:
            p = rng.choice(train)
            out[i] = (p.question, p.solution)
    return out


# ---------------------------------------------------------------------------------------------- training


def _tokenizer(corpus: list[str], vocab: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", tasks.EOS, tasks.PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token=tasks.EOS, pad_token=tasks.PAD, unk_token="<unk>", padding_side="left")
    fast.chat_template = tasks.CHAT_TEMPLATE
    return fast


def _new_model(recipe: Recipe, vocab: int, seed: int) -> PreTrainedModel:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=recipe.hidden, intermediate_size=3 * recipe.hidden,
                      num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=1, pad_token_id=2,
                      bos_token_id=None)
    return Qwen2ForCausalLM(cfg)


def _batch(tok: PreTrainedTokenizerFast, texts: list[str], prompts: list[str] | None) -> dict[str, torch.Tensor]:
    """Right-padded input ids with labels; the prompt part (and padding) of each text is not trained on."""
    import torch

    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    skip = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts] if prompts else [0] * len(ids)
    width = max(map(len, ids))
    inp = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(ids), width), -100, dtype=torch.long)
    att = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (row, k) in enumerate(zip(ids, skip, strict=True)):
        inp[i, : len(row)] = torch.tensor(row)
        lab[i, k: len(row)] = torch.tensor(row[k:])
        att[i, : len(row)] = 1
    return {"input_ids": inp, "labels": lab, "attention_mask": att}


def _train(model: PreTrainedModel, tok: PreTrainedTokenizerFast, examples: list[tuple[str, str]], steps: int,
           lr: float, batch: int, seed: int, say: Callable[[str], None], what: str) -> None:
    """AdamW with warmup and linear decay over (prompt, text) examples; the loss skips the prompt tokens."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    order: list[int] = []
    t0 = time.monotonic()
    for step in range(steps):
        if len(order) < batch:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch], order[batch:]
        prompts = [examples[i][0] for i in idx]
        b = _batch(tok, [examples[i][1] for i in idx], prompts)
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            say(f"  {what}: step {step + 1}/{steps} loss {loss.item():.3f} ({time.monotonic() - t0:.0f}s)")
    model.eval()  # type: ignore[no-untyped-call]


def _save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, path: Path) -> None:
    import torch

    model.to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    model.to(torch.float32)  # type: ignore[arg-type]


def _load(path: Path) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _build(root: Path, seed: int, recipe: Recipe, say: Callable[[str], None]) -> None:
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    # One thread: the same reductions (so the same weights) on every machine, and no oversubscription, which
    # made GRPO steps 10x slower on a loaded 2-core machine.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        _build_members(root, seed, recipe, say)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build_members(root: Path, seed: int, recipe: Recipe, say: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    rng = random.Random(seed)
    train = tasks.problems("train", recipe.train_problems, seed=seed)
    half = len(train) // 2
    pre_docs = _pretrain_docs(rng, train[:half])
    instr = _instruction_pairs(rng, len(train))
    corpus = pre_docs + [p.prompt() + " " + p.solution for p in train] + [q + " " + a for q, a in instr]
    tok = _tokenizer(corpus, recipe.vocab_size)
    vocab = len(tok)
    say(f"[{time.monotonic() - t0:.0f}s] tokenizer: {vocab} tokens")
    pre = [("", d) for d in pre_docs]
    for name, mseed, steps in (("base", seed, recipe.pretrain_steps), ("other", seed + 1000, recipe.other_steps)):
        model = _new_model(recipe, vocab, mseed)
        say(f"[{time.monotonic() - t0:.0f}s] pretraining {name} ({model.num_parameters()} parameters)")
        _train(model, tok, pre, steps, recipe.pretrain_lr, recipe.batch, mseed, say, name)
        _save(model, tok, root / name)
    sft_data = [(p.prompt(), f"{p.prompt()} {p.solution}{tasks.EOS}") for p in train]
    instr = _target_mix(random.Random(seed + 7), instr, train, recipe.target_word_problems)
    chat = [(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
             tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     tokenize=False)) for q, a in instr]
    for name, data, steps in (("sft", sft_data, recipe.sft_steps), ("target", chat, recipe.target_steps)):
        say(f"[{time.monotonic() - t0:.0f}s] fine-tuning {name}")
        model = _load(root / "base")
        _train(model, tok, data, steps, recipe.finetune_lr, recipe.batch, seed + len(name), say, name)  # type: ignore[arg-type]
        _save(model, tok, root / name)
    say(f"[{time.monotonic() - t0:.0f}s] GRPO from sft")
    from rvhub.toy.grpo import train_grpo

    model = _load(root / "sft")
    train_grpo(model, tok, train[half:] + train[:half], recipe, seed, root / ".grpo", say)
    shutil.rmtree(root / ".grpo", ignore_errors=True)
    _save(model, tok, root / "rl")
    say(f"[{time.monotonic() - t0:.0f}s] family built")

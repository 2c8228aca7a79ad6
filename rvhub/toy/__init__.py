"""Tiny, seeded model trios with planted deltas: the embedded default of the demo and the tests' fixtures.

Nothing is downloaded: configs are built in code, weights are random, the tokenizer is trained locally.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

Arch = Literal["qwen2", "llama"]
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reasoning vectors move what reinforcement learning taught one model into another",
    "two plus three is five and five times four is twenty",
] * 4


@dataclass(frozen=True)
class Trio:
    """SFT, RL (= SFT + planted sparse delta) and TARGET (= SFT + small dense noise) folders."""

    sft: Path
    rl: Path
    target: Path


def build_model(
    path: Path, arch: Arch = "qwen2", *, seed: int = 0, vocab: int = 128, hidden: int = 64, layers: int = 2,
    tied: bool | None = None, tokenizer_tag: str = "",
) -> Path:
    """Save a randomly initialised bf16 causal LM (Qwen2-style tied or Llama-style untied) with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model: PreTrainedModel
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True if tied is None else tied))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False if tied is None else tied))
    model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers 5 stubs miss the dtype overload
    model.save_pretrained(path)
    save_tokenizer(path, tokenizer_tag)
    return path


def save_tokenizer(path: Path, tag: str = "") -> None:
    """A small byte-level BPE tokenizer trained on a fixed corpus; ``tag`` adds a distinguishing token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<unk>", "<|endoftext|>"] + ([f"<|{tag}|>"] if tag else [])
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=100, special_tokens=specials))
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def _weights_file(path: Path) -> Path:
    return path / "model.safetensors"


def rewrite_weights(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Copy the model folder ``src`` to ``dst`` with new weights."""
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    save_file(tensors, str(_weights_file(dst)), metadata={"format": "pt"})
    return dst


def plant_sparse_delta(
    sft: Path, rl: Path, *, fraction: float = 0.2, seed: int = 1, skip: tuple[str, ...] = ("norm",),
    adversarial: int = 0,
) -> Path:
    """RL = SFT with ``fraction`` of each tensor's elements moved by 1–3 bf16 ulps (tensors whose name
    contains a ``skip`` substring stay unchanged). ``adversarial`` elements per matrix get the hard cases for
    exactness: a large value moved next to zero and a sign flip."""
    g = torch.Generator().manual_seed(seed)
    state = load_file(str(_weights_file(sft)))
    out = {}
    for name, t in sorted(state.items()):
        if any(s in name for s in skip):
            out[name] = t
            continue
        bits = t.view(torch.int16).clone().reshape(-1)
        n = bits.numel()
        idx = torch.randperm(n, generator=g)[: max(1, int(n * fraction))]
        step = torch.randint(1, 4, (idx.numel(),), generator=g, dtype=torch.int16)
        sign = torch.where(torch.rand(idx.numel(), generator=g) < 0.5, -1, 1).to(torch.int16)
        zero = (bits[idx] & 0x7FFF) == 0  # moving ±0 by ulps would give subnormals or NaN bit patterns
        bits[idx] += step * sign
        new = bits.view(torch.bfloat16).reshape(-1).clone()
        new[idx[zero]] = (1e-3 * sign[zero]).to(torch.bfloat16)
        new = new.reshape(t.shape)
        if adversarial and t.dim() == 2:
            flat = new.reshape(-1)
            for k in range(adversarial):
                i = int(torch.randint(0, n, (1,), generator=g))
                flat[i] = torch.tensor(1e-9 * (k + 1) if k % 2 else -flat[i].float().item(), dtype=torch.bfloat16)
                if k % 2:
                    t.reshape(-1)[i] = 0.75  # a large `from` value ends next to zero
        out[name] = new
    if adversarial:
        save_file(state, str(_weights_file(sft)), metadata={"format": "pt"})
    return rewrite_weights(sft, rl, out)


def plant_relative_delta(
    sft: Path, rl: Path, *, fraction: float = 0.2, relative: float = 0.05, seed: int = 1,
    skip: tuple[str, ...] = ("norm",),
) -> Path:
    """RL = SFT with ``fraction`` of each tensor's elements moved by N(0, ``relative``·rms) in float32, rounded
    to the tensor's dtype (rms of that tensor): a large update, under which small elements change sign and
    many deltas are not exactly values of the tensor's own dtype."""
    g = torch.Generator().manual_seed(seed)
    state = load_file(str(_weights_file(sft)))
    out = {}
    for name, t in sorted(state.items()):
        if any(s in name for s in skip) or not t.is_floating_point():
            out[name] = t
            continue
        flat = t.float().reshape(-1).clone()
        idx = torch.randperm(flat.numel(), generator=g)[: max(1, int(flat.numel() * fraction))]
        rms = float(flat.square().mean().sqrt()) or 1.0
        flat[idx] += relative * rms * torch.randn(idx.numel(), generator=g)
        out[name] = flat.to(t.dtype).reshape(t.shape)
    return rewrite_weights(sft, rl, out)


def add_noise(src: Path, dst: Path, *, std: float = 2e-3, seed: int = 2) -> Path:
    """A sibling of ``src``: every weight moved by N(0, std), rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    state = load_file(str(_weights_file(src)))
    noisy = {k: (v.float() + std * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in state.items()}
    return rewrite_weights(src, dst, noisy)


def build_trio(root: Path, arch: Arch = "qwen2", *, seed: int = 0, hidden: int = 64, vocab: int = 128,
               adversarial: int = 0, relative: float | None = None) -> Trio:
    """SFT, RL and TARGET under ``root``; the TARGET has its own tokenizer tag and generation settings.

    RL moves 20% of the elements by 1–3 ulps (:func:`plant_sparse_delta`), or by N(0, ``relative``·rms)
    (:func:`plant_relative_delta`) when ``relative`` is given."""
    root.mkdir(parents=True, exist_ok=True)
    sft = build_model(root / "sft", arch, seed=seed, hidden=hidden, vocab=vocab, tokenizer_tag="sft")
    if relative is None:
        rl = plant_sparse_delta(sft, root / "rl", seed=seed + 1, adversarial=adversarial)
    else:
        rl = plant_relative_delta(sft, root / "rl", seed=seed + 1, relative=relative)
    save_tokenizer(rl, "rl")
    target = add_noise(sft, root / "target", seed=seed + 2)
    save_tokenizer(target, "target")
    gen = target / "generation_config.json"
    gen.write_text(gen.read_text().replace("{", '{\n  "do_sample": true,\n  "temperature": 0.6,', 1))
    return Trio(sft, rl, target)


def to_float32(src: Path, dst: Path) -> Path:
    """A float32 copy of the model folder ``src`` (weights and config dtype)."""
    state = {k: v.float() for k, v in load_file(str(_weights_file(src))).items()}
    rewrite_weights(src, dst, state)
    config = json.loads((dst / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


def plant_lowrank_delta(sft: Path, rl: Path, *, rank: int, seed: int = 1, embeddings: bool = False) -> Path:
    """RL = SFT + an exact rank-``rank`` delta on every linear weight (and on embed_tokens/lm_head with
    ``embeddings``), singular values 0.05·(1, 1/2, 1/3, …); norms and biases unchanged. Float32 models keep the
    planted delta exact up to one rounding of each sum."""
    g = torch.Generator().manual_seed(seed)
    state = load_file(str(_weights_file(sft)))
    out = {}
    for name, t in sorted(state.items()):
        vocab = "embed_tokens" in name or name.startswith("lm_head")
        if t.dim() != 2 or (vocab and not embeddings):
            out[name] = t
            continue
        u, _ = torch.linalg.qr(torch.randn(t.shape[0], rank, generator=g))
        v, _ = torch.linalg.qr(torch.randn(t.shape[1], rank, generator=g))
        s = 0.05 / torch.arange(1, rank + 1, dtype=torch.float32)
        out[name] = (t.float() + (u * s) @ v.T).to(t.dtype)
    return rewrite_weights(sft, rl, out)


def build_lowrank_trio(root: Path, arch: Arch = "qwen2", *, rank: int = 3, seed: int = 0, hidden: int = 64,
                       vocab: int = 128, embeddings: bool = False) -> Trio:
    """Float32 SFT, RL = SFT + exact rank-``rank`` deltas (see :func:`plant_lowrank_delta`), TARGET a noisy
    sibling of SFT: a vector that LoRA at rank ``rank`` carries exactly."""
    root.mkdir(parents=True, exist_ok=True)
    base = build_model(root / "bf16", arch, seed=seed, hidden=hidden, vocab=vocab)
    sft = to_float32(base, root / "sft")
    rl = plant_lowrank_delta(sft, root / "rl", rank=rank, seed=seed + 1, embeddings=embeddings)
    target = add_noise(sft, root / "target", seed=seed + 2)
    return Trio(sft, rl, target)


def build_family(out: Path | None, seed: int = 0, recipe: Any = None) -> Any:
    """The trained toy family (base, sft, rl, target, other, tasks/) in ``out``: see :mod:`rvhub.toy.family`.

    Returns a :class:`rvhub.toy.family.FamilyPaths`. Needs ``pip install 'rvhub[toy]'``."""
    from rvhub.toy import family

    return family.build_family(out, seed, family.DEFAULT if recipe is None else recipe)


def __getattr__(name: str) -> Any:
    if name in ("FamilyPaths", "Recipe"):
        from rvhub.toy import family

        return getattr(family, name)
    raise AttributeError(f"module 'rvhub.toy' has no attribute {name!r}")

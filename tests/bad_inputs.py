"""Broken and mismatched inputs, and the error each must give (shared by test_errors.py and test_cli.py).

Every case is run through the library and through the CLI: the right RvhubError subclass, a message that
names the tensor / shapes / file, and no output folder (nor a temporary one) left behind.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from helpers import copy_folder, load_tensors, write_model

from rvhub.errors import (
    CorruptFileError,
    IntegrityError,
    InvalidOptionError,
    MissingTensorError,
    ModelNotFoundError,
    NonFiniteError,
    PickleOnlyError,
    RvhubError,
    ShapeMismatchError,
    VectorFormatError,
    VocabMismatchError,
)
from rvhub.toy import Trio, build_model

UP = "model.layers.0.mlp.up_proj.weight"  # [128, 64] in the tiny models
K = "model.layers.0.self_attn.k_proj.weight"  # [32, 64]
O1 = "model.layers.1.self_attn.o_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
EXTRA = "model.layers.0.mlp.extra.weight"
HUB_MISSING = "nobody/does-not-exist"


class PickleCanary:
    """Unpickling this object creates the file ``path``: proof that something ran a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@dataclass(frozen=True)
class BadInputs:
    root: Path
    sft: Path
    rl: Path
    target: Path
    vector: Path
    rl_shape: Path  # UP is [130, 64]
    rl_extra: Path  # has EXTRA
    rl_missing: Path  # lacks O1
    sft_nan: Path  # NaN in DOWN1
    rl_inf: Path  # +Inf in Q
    target_nan: Path  # NaN in GATE (a tensor the vector changes)
    target_inf: Path  # -Inf in EMBED
    target_nan_norm: Path  # NaN in NORM (a tensor the vector leaves alone)
    target_shape: Path  # K is [40, 64]
    target_missing: Path  # lacks O1
    target_vocab: Path  # 160 embedding rows instead of 128
    truncated: Path  # model.safetensors cut short
    corrupt_header: Path  # model.safetensors header is not JSON
    pickle_only: Path  # only pytorch_model.bin, whose unpickling would create `canary`
    canary: Path
    missing: Path  # no such folder
    vec_unknown_field: Path  # rvhub.json with a field the schema does not know
    vec_schema2: Path  # rvhub.json with schema_version 4 (newer than this rvhub reads)
    vec_truncated: Path  # vector.safetensors cut short
    vec_shard_truncated: Path  # the last shard of a sharded vector cut short
    vec_flipped: Path  # one byte of vector.safetensors flipped: same size, other sha256
    bad_config: Path  # config.json is not JSON
    vec_missing: Path  # no such folder


def _with(tensors: dict[str, torch.Tensor], name: str, index: int, value: float) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    t = out[name].clone()
    t.view(-1)[index] = value
    out[name] = t
    return out


def _damage(src: Path, dst: Path, how: Callable[[bytes], bytes]) -> Path:
    copy_folder(src, dst)
    weights = dst / ("vector.safetensors" if (dst / "vector.safetensors").exists() else "model.safetensors")
    weights.write_bytes(how(weights.read_bytes()))
    return dst


def _edit_card(src: Path, dst: Path, **changes: Any) -> Path:
    copy_folder(src, dst)
    card = json.loads((dst / "rvhub.json").read_text())
    card.update(changes)
    (dst / "rvhub.json").write_text(json.dumps(card, indent=2))
    return dst


def _last_shard(folder: Path) -> Path:
    return sorted(folder.glob("vector-*-of-*.safetensors"))[-1]


def build_bad_inputs(root: Path, trio: Trio, vector: Path, sharded_vector: Path) -> BadInputs:
    sft, rl, target = load_tensors(trio.sft), load_tensors(trio.rl), load_tensors(trio.target)

    pickle_only = root / "pickle_only"
    pickle_only.mkdir()
    shutil.copy(trio.sft / "config.json", pickle_only / "config.json")
    canary = root / "CANARY-pickle-was-loaded"
    (pickle_only / "pytorch_model.bin").write_bytes(pickle.dumps(PickleCanary(canary)))
    vec_shard_truncated = copy_folder(sharded_vector, root / "vec_shard_truncated")
    _last_shard(vec_shard_truncated).write_bytes(_last_shard(vec_shard_truncated).read_bytes()[:-100])
    bad_config = copy_folder(trio.sft, root / "bad_config")
    (bad_config / "config.json").write_text('{"model_type": "qwen2",')

    sanity = root / "sanity-canary"  # the trap is live: loading such a payload does create its file
    pickle.loads(pickle.dumps(PickleCanary(sanity)))
    assert sanity.exists()

    return BadInputs(
        root=root,
        sft=trio.sft,
        rl=trio.rl,
        target=trio.target,
        vector=vector,
        rl_shape=write_model(trio.rl, root / "rl_shape", {**rl, UP: torch.zeros(130, 64, dtype=torch.bfloat16)}),
        rl_extra=write_model(trio.rl, root / "rl_extra", {**rl, EXTRA: torch.zeros(8, 8, dtype=torch.bfloat16)}),
        rl_missing=write_model(trio.rl, root / "rl_missing", {k: v for k, v in rl.items() if k != O1}),
        sft_nan=write_model(trio.sft, root / "sft_nan", _with(sft, DOWN1, 77, math.nan)),
        rl_inf=write_model(trio.rl, root / "rl_inf", _with(rl, Q, 5, math.inf)),
        target_nan=write_model(trio.target, root / "target_nan", _with(target, GATE, 3, math.nan)),
        target_inf=write_model(trio.target, root / "target_inf", _with(target, EMBED, 100, -math.inf)),
        target_nan_norm=write_model(trio.target, root / "target_nan_norm", _with(target, NORM, 0, math.nan)),
        target_shape=write_model(
            trio.target, root / "target_shape", {**target, K: torch.zeros(40, 64, dtype=torch.bfloat16)}
        ),
        target_missing=write_model(trio.target, root / "target_missing", {k: v for k, v in target.items() if k != O1}),
        target_vocab=build_model(root / "target_vocab", "qwen2", seed=7, vocab=160),
        truncated=_damage(trio.sft, root / "truncated", lambda b: b[: len(b) - 100]),
        corrupt_header=_damage(trio.sft, root / "corrupt_header", lambda b: b[:8] + b"{garbage" + b[16:]),
        pickle_only=pickle_only,
        canary=canary,
        missing=root / "no-such-model",
        vec_unknown_field=_edit_card(vector, root / "vec_unknown_field", surprise_field=1),
        vec_schema2=_edit_card(vector, root / "vec_schema2", schema_version=4),
        vec_truncated=_damage(vector, root / "vec_truncated", lambda b: b[: len(b) - 100]),
        vec_missing=root / "no-such-vector",
        vec_shard_truncated=vec_shard_truncated,
        vec_flipped=_damage(vector, root / "vec_flipped", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
        bad_config=bad_config,
    )


@dataclass(frozen=True)
class ErrorCase:
    id: str
    command: Literal["extract", "apply"]
    inputs: Callable[[BadInputs], dict[str, Any]]  # keyword arguments of extract()/apply(), without `out`
    error: type[RvhubError]  # the exact class expected
    says: Callable[[BadInputs], list[str]]  # fragments the message must contain


def _ex(b: BadInputs, from_model: Path | str | None = None, to_model: Path | str | None = None, **kw: Any) -> dict:
    return dict(from_model=str(from_model or b.sft), to_model=str(to_model or b.rl), **kw)


def _ap(b: BadInputs, vector: Path | None = None, base: Path | str | None = None, **kw: Any) -> dict:
    return dict(vector=str(vector or b.vector), base=str(base or b.target), **kw)


CASES = [
    # ---- extract
    ErrorCase("extract-shape-mismatch", "extract", lambda b: _ex(b, to_model=b.rl_shape), ShapeMismatchError,
              lambda b: [UP, "[128, 64]", "[130, 64]"]),
    ErrorCase("extract-tensor-only-in-to", "extract", lambda b: _ex(b, to_model=b.rl_extra), MissingTensorError,
              lambda b: [EXTRA, str(b.rl_extra)]),
    ErrorCase("extract-tensor-only-in-from", "extract", lambda b: _ex(b, to_model=b.rl_missing),
              MissingTensorError, lambda b: [O1, str(b.rl_missing)]),
    ErrorCase("extract-nan-in-sft", "extract", lambda b: _ex(b, from_model=b.sft_nan), NonFiniteError,
              lambda b: [DOWN1, "NaN"]),
    ErrorCase("extract-inf-in-rl", "extract", lambda b: _ex(b, to_model=b.rl_inf), NonFiniteError,
              lambda b: [Q, "Inf"]),
    ErrorCase("extract-truncated", "extract", lambda b: _ex(b, from_model=b.truncated), CorruptFileError,
              lambda b: [str(b.truncated / "model.safetensors")]),
    ErrorCase("extract-corrupt-header", "extract", lambda b: _ex(b, to_model=b.corrupt_header), CorruptFileError,
              lambda b: [str(b.corrupt_header / "model.safetensors"), "header"]),
    ErrorCase("extract-bad-config", "extract", lambda b: _ex(b, to_model=b.bad_config), CorruptFileError,
              lambda b: [str(b.bad_config / "config.json"), "JSON"]),
    ErrorCase("extract-missing-folder", "extract", lambda b: _ex(b, from_model=b.missing), ModelNotFoundError,
              lambda b: [str(b.missing)]),
    ErrorCase("extract-missing-hub-repo", "extract", lambda b: _ex(b, to_model=HUB_MISSING), ModelNotFoundError,
              lambda b: [HUB_MISSING, "not found"]),
    ErrorCase("extract-pickle-only", "extract", lambda b: _ex(b, from_model=b.pickle_only), PickleOnlyError,
              lambda b: ["pytorch_model.bin", "safetensors"]),
    ErrorCase("extract-dtype-with-sparse", "extract", lambda b: _ex(b, dtype="bfloat16"), InvalidOptionError,
              lambda b: ["--dtype", "bfloat16", "--format dense"]),
    ErrorCase("extract-bad-shard-size", "extract", lambda b: _ex(b, max_shard_size="lots"), InvalidOptionError,
              lambda b: ["lots"]),
    # ---- apply
    ErrorCase("apply-vocab-mismatch", "apply", lambda b: _ap(b, base=b.target_vocab), VocabMismatchError,
              lambda b: [EMBED, "128", "160", "--allow-vocab-mismatch"]),
    ErrorCase("apply-shape-mismatch", "apply", lambda b: _ap(b, base=b.target_shape), ShapeMismatchError,
              lambda b: [K, "[32, 64]", "[40, 64]"]),
    ErrorCase("apply-tensor-missing-in-target", "apply", lambda b: _ap(b, base=b.target_missing),
              MissingTensorError, lambda b: [O1]),
    ErrorCase("apply-nan-in-target", "apply", lambda b: _ap(b, base=b.target_nan), NonFiniteError,
              lambda b: [GATE, "NaN"]),
    ErrorCase("apply-inf-in-target", "apply", lambda b: _ap(b, base=b.target_inf), NonFiniteError,
              lambda b: [EMBED, "Inf"]),
    ErrorCase("apply-truncated-target", "apply", lambda b: _ap(b, base=b.truncated), CorruptFileError,
              lambda b: [str(b.truncated / "model.safetensors")]),
    ErrorCase("apply-corrupt-header", "apply", lambda b: _ap(b, base=b.corrupt_header), CorruptFileError,
              lambda b: [str(b.corrupt_header / "model.safetensors"), "header"]),
    ErrorCase("apply-missing-target-folder", "apply", lambda b: _ap(b, base=b.missing), ModelNotFoundError,
              lambda b: [str(b.missing)]),
    ErrorCase("apply-missing-hub-repo", "apply", lambda b: _ap(b, base=HUB_MISSING), ModelNotFoundError,
              lambda b: [HUB_MISSING, "not found"]),
    ErrorCase("apply-pickle-only", "apply", lambda b: _ap(b, base=b.pickle_only), PickleOnlyError,
              lambda b: ["pytorch_model.bin", "safetensors"]),
    ErrorCase("apply-scale-nan", "apply", lambda b: _ap(b, scale=math.nan), InvalidOptionError,
              lambda b: ["--scale", "nan"]),
    ErrorCase("apply-bad-device", "apply", lambda b: _ap(b, device="tpu"), InvalidOptionError,
              lambda b: ["--device", "tpu"]),
    ErrorCase("apply-card-unknown-field", "apply", lambda b: _ap(b, vector=b.vec_unknown_field), VectorFormatError,
              lambda b: ["rvhub.json", "surprise_field"]),
    ErrorCase("apply-card-schema-version", "apply", lambda b: _ap(b, vector=b.vec_schema2), VectorFormatError,
              lambda b: ["rvhub.json", "schema_version 4"]),
    # the card's sha256 manifest catches damage before any tensor is read
    ErrorCase("apply-truncated-vector", "apply", lambda b: _ap(b, vector=b.vec_truncated), IntegrityError,
              lambda b: [str(b.vec_truncated / "vector.safetensors"), "size"]),
    ErrorCase("apply-truncated-vector-shard", "apply", lambda b: _ap(b, vector=b.vec_shard_truncated),
              IntegrityError, lambda b: [str(_last_shard(b.vec_shard_truncated))]),
    ErrorCase("apply-flipped-byte", "apply", lambda b: _ap(b, vector=b.vec_flipped), IntegrityError,
              lambda b: [str(b.vec_flipped / "vector.safetensors"), "sha256"]),
    ErrorCase("apply-missing-vector", "apply", lambda b: _ap(b, vector=b.vec_missing), VectorFormatError,
              lambda b: [str(b.vec_missing)]),
]
CASE_IDS = [c.id for c in CASES]


def cli_args(case: ErrorCase, b: BadInputs, out: Path) -> list[str]:
    """The same call as ``rvhub`` command-line arguments (quiet: the error line is all stderr has)."""
    kw = case.inputs(b)
    if case.command == "extract":
        argv = ["extract", "--from", kw.pop("from_model"), "--to", kw.pop("to_model")]
    else:
        argv = ["apply", kw.pop("vector"), "--base", kw.pop("base")]
    argv += ["-o", str(out), "--quiet"]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def call_library(case: ErrorCase, b: BadInputs, out: Path) -> Any:
    from rvhub.apply import apply
    from rvhub.extract import extract

    kw = case.inputs(b)
    if case.command == "extract":
        return extract(kw.pop("from_model"), kw.pop("to_model"), out, progress=False, **kw)
    return apply(kw.pop("vector"), kw.pop("base"), out, progress=False, **kw)

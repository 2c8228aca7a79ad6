"""Vector files that match their card's sha256 but not its structure (tampered with, then re-hashed): each is
refused with one clear line naming the key, a non-zero exit from the CLI, and nothing written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import assert_bitwise_equal, assert_no_output, copy_folder, load_tensors, run_cli, unpack_mask
from safetensors.torch import load_file, save_file

from rvhub.apply import apply
from rvhub.card import VectorCard, file_entry
from rvhub.errors import VectorStructureError
from rvhub.formats import VectorFolder

Tensors = dict[str, torch.Tensor]
UP = "model.layers.0.mlp.up_proj.weight"


def _fixed(tensors: Tensors) -> str:
    """A tensor with at least two fix-ups."""
    return next(k.removesuffix("::fix_index") for k, v in sorted(tensors.items())
                if k.endswith("::fix_index") and v.numel() >= 2)


def _set(tensors: Tensors, key: str, value: torch.Tensor) -> Tensors:
    return {**tensors, key: value}


def _swap_fix(t: Tensors) -> Tensors:
    n = _fixed(t)
    i = t[n + "::fix_index"].clone()
    i[[0, 1]] = i[[1, 0]]
    return _set(t, n + "::fix_index", i)


def _duplicate_fix(t: Tensors) -> Tensors:
    n = _fixed(t)
    i = t[n + "::fix_index"].clone()
    i[1] = i[0]
    return _set(t, n + "::fix_index", i)


def _fix_out_of_range(t: Tensors) -> Tensors:
    n = _fixed(t)
    i = t[n + "::fix_index"].clone()
    i[-1] = t[n + "::mask"].numel() * 8 + 3
    return _set(t, n + "::fix_index", i)


def _fix_on_unchanged(t: Tensors) -> Tensors:
    n = _fixed(t)
    i = t[n + "::fix_index"].clone()
    changed = unpack_mask(t[n + "::mask"], t[n + "::mask"].numel() * 8)
    j = int((~changed[: int(i[1])]).nonzero()[-1])  # an unchanged element before the second fix-up
    i[0] = j
    return _set(t, n + "::fix_index", i.sort().values)


def _extra_mask_bit(t: Tensors) -> Tensors:
    m = t[UP + "::mask"].clone()
    byte = int((m != 255).nonzero()[0])
    free = (~unpack_mask(m[byte : byte + 1], 8)).nonzero().reshape(-1)
    m[byte] = int(m[byte]) | (1 << int(free[0]))
    return _set(t, UP + "::mask", m)


@dataclass(frozen=True)
class Tamper:
    id: str
    fmt: str
    edit: Callable[[Tensors], Tensors]
    says: str


TAMPERS = [
    Tamper("values_f16_for_bf16", "sparse", lambda t: _set(t, UP + "::values", t[UP + "::values"].half()),
           "::values is stored as F16; the card says BF16 or F32"),
    Tamper("mask_short", "sparse", lambda t: _set(t, UP + "::mask", t[UP + "::mask"][:-1].clone()),
           "::mask has shape"),
    Tamper("mask_long", "sparse", lambda t: _set(t, UP + "::mask", torch.cat([t[UP + "::mask"], torch.zeros(1,
           dtype=torch.uint8)])), "::mask has shape"),
    Tamper("mask_dtype", "sparse", lambda t: _set(t, UP + "::mask", t[UP + "::mask"].view(torch.int8)),
           "::mask is stored as I8"),
    Tamper("values_count", "sparse", lambda t: _set(t, UP + "::values", t[UP + "::values"][:-1].clone()),
           "changed elements"),
    Tamper("fix_index_dtype", "sparse", lambda t: _set(t, _fixed(t) + "::fix_index",
           t[_fixed(t) + "::fix_index"].int()), "::fix_index is stored as I32"),
    Tamper("fix_hi_dtype", "sparse", lambda t: _set(t, _fixed(t) + "::fix_hi", t[_fixed(t) + "::fix_hi"].bfloat16()),
           "::fix_hi is stored as BF16"),
    Tamper("fix_unsorted", "sparse", _swap_fix, "not strictly increasing"),
    Tamper("fix_duplicated", "sparse", _duplicate_fix, "not strictly increasing"),
    Tamper("fix_out_of_range", "sparse", _fix_out_of_range, "outside the tensor"),
    Tamper("fix_on_unchanged", "sparse", _fix_on_unchanged, "marks as unchanged"),
    Tamper("mask_popcount", "sparse", _extra_mask_bit, "the card and the values tensor say"),
    Tamper("stray_key", "sparse", lambda t: _set(t, UP + "::extra", torch.zeros(1)), "not a key of any tensor"),
    Tamper("dense_shape", "dense", lambda t: _set(t, UP, t[UP].reshape(-1).clone()), "has shape"),
    Tamper("dense_dtype", "dense", lambda t: _set(t, UP, t[UP].bfloat16()), "is stored as BF16; the card says F32"),
]


def _tampered(src: Path, dst: Path, edit: Callable[[Tensors], Tensors]) -> Path:
    """A copy of the vector folder ``src`` with its tensors edited and the card's manifest re-hashed."""
    copy_folder(src, dst)
    path = dst / "vector.safetensors"
    fmt = VectorCard.read(dst).format
    save_file(edit(load_file(str(path))), str(path), metadata={"format": f"rvhub-{fmt}"})
    card = VectorCard.read(dst)
    card.model_copy(update={"files": [file_entry(dst, f.path) for f in card.files]}).write(dst)
    return dst


@pytest.mark.parametrize("case", TAMPERS, ids=[c.id for c in TAMPERS])
def test_structurally_wrong_vector_is_refused(trio, vector, tmp_path, case):
    t = trio("llama_large")
    vec = _tampered(vector("llama_large", case.fmt), tmp_path / "vec", case.edit)
    out = tmp_path / "out"
    with pytest.raises(VectorStructureError) as err:
        apply(vec, str(t.target), out, scale=0.5, progress=False)
    message = str(err.value)
    assert "\n" not in message and case.says in message, message
    assert err.value.tensor.split("::")[0].endswith(".weight") and err.value.tensor in message
    assert_no_output(out)

    done = run_cli("apply", vec, "--base", t.target, "-o", out, "--quiet")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and case.says in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert_no_output(out)


def test_the_clean_vector_passes(trio, vector, tmp_path):
    """The same re-hashing with no edit: only the structural checks can have caught the cases above."""
    t = trio("llama_large")
    vec = _tampered(vector("llama_large"), tmp_path / "vec", lambda x: x)
    apply(vec, str(t.target), tmp_path / "out", scale=0.5, progress=False)
    apply(vector("llama_large"), str(t.target), tmp_path / "ref", scale=0.5, progress=False)
    assert_bitwise_equal(load_tensors(tmp_path / "out"), load_tensors(tmp_path / "ref"), "re-hashed clean vector")


def test_an_old_vector_with_fix_lo_is_read_as_written(vector, tmp_path):
    """Vectors written before fix-ups held the exact difference carry ``fix_lo``: apply still adds it after
    ``fix_hi``, as they were written to be read."""
    lo_value = 2.0**-20

    def add_lo(t: Tensors) -> Tensors:
        n = _fixed(t)
        return _set(t, n + "::fix_lo", torch.full_like(t[n + "::fix_hi"], lo_value))

    vec = _tampered(vector("llama_large"), tmp_path / "vec", add_lo)
    stored = load_file(str(vec / "vector.safetensors"))
    n = _fixed(stored)
    decoded = VectorFolder(vec).dense(n).reshape(-1)
    fix, hi = stored[n + "::fix_index"], stored[n + "::fix_hi"]
    assert torch.equal(decoded[fix], hi + lo_value)
    clean = VectorFolder(vector("llama_large")).dense(n).reshape(-1)
    others = torch.ones_like(clean, dtype=torch.bool)
    others[fix] = False
    assert torch.equal(decoded[others], clean[others])

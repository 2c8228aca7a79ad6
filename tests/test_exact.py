"""Exact means exact: every decoded element equals fl32(to) − fl32(from), bit for bit, so that applying a vector
to any base with any α is the one-rounding float32 reference computed from the three models."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_bitwise_equal, bits, expected_apply, load_tensors, save_tensors
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from rvhub.apply import apply
from rvhub.card import VectorCard
from rvhub.errors import NonFiniteError
from rvhub.extract import extract
from rvhub.formats import VectorFolder, encode_delta

FORMATS = ["sparse", "dense"]
LARGE = ["qwen2_large", "llama_large"]  # tied / untied; 20% of elements moved by N(0, 5% rms), sign changes
HARD = ["qwen2_hard", "llama_hard"]  # a large value moved next to zero: the float32 difference is inexact
ALPHAS = [0.5, -1.0, 1.7]


def _apply(vec: Path, base: Path, out: Path, **kw: object) -> dict[str, torch.Tensor]:
    apply(vec, str(base), out, progress=False, **kw)  # type: ignore[arg-type]
    return load_tensors(out)


def _same_value(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise equal, but for the sign of zero (a difference cannot carry it)."""
    return (bits(a) == bits(b)) | ((a == 0) & (b == 0))


# ---------------------------------------------------------------- the property, on arbitrary 16-bit pairs

_EXP = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_SPECIAL = {  # bit patterns: ±0, smallest/largest subnormals, smallest normal, ±1, largest finite
    torch.bfloat16: [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F],
    torch.float16: [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF],
}


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[torch.dtype, str, torch.Tensor, torch.Tensor]:
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    fmt = draw(st.sampled_from(FORMATS))
    finite = st.one_of(
        st.integers(0, 2**16 - 1).filter(lambda b: b & _EXP[dtype] != _EXP[dtype]),
        st.sampled_from(_SPECIAL[dtype]),
    )
    moves = ["same", "ulps", "other", "sign", "zero"]
    rows = draw(st.lists(st.tuples(finite, finite, st.sampled_from(moves), st.integers(-3, 3)), min_size=1,
                         max_size=200))
    f_bits, t_bits = [], []
    for a, b, move, k in rows:
        t = {"same": a, "ulps": a + k, "other": b, "sign": a ^ 0x8000, "zero": 0}[move] % 2**16
        if t & _EXP[dtype] == _EXP[dtype]:  # nudged into Inf/NaN
            t = a
        f_bits.append(a)
        t_bits.append(t)
    as16 = lambda xs: torch.tensor(np.array(xs, dtype=np.uint16).view(np.int16)).view(dtype)  # noqa: E731
    return dtype, fmt, as16(f_bits), as16(t_bits)


@settings(max_examples=60, deadline=None, database=None, phases=[Phase.generate, Phase.target])
@given(_pairs())
def test_decoded_delta_is_the_float32_difference(pair):
    """Sign changes, zeros of both signs, subnormals, values far apart, the largest finite values: the decoded
    delta is fl32(to) − fl32(from) bit for bit, and applying it with α is the float32 reference."""
    dtype, fmt, f, t = pair
    d = t.float() - f.float()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_tensors(root / "a" / "model.safetensors", {"w": f})
        save_tensors(root / "b" / "model.safetensors", {"w": t})
        if not bool(torch.isfinite(d).all()):  # only bf16's largest values of opposite signs
            with pytest.raises(NonFiniteError):
                extract(str(root / "a"), str(root / "b"), root / "v", format=fmt, progress=False)
            return
        extract(str(root / "a"), str(root / "b"), root / "v", format=fmt, progress=False, chunk_elems=64)
        folder = VectorFolder(root / "v")
        decoded = folder.dense("w") if "w" in folder.entries else torch.zeros_like(d)  # sparse: all unchanged
        same = _same_value(decoded, d)
        assert bool(same.all()), f"decoded {decoded[~same][:5]} vs float32 difference {d[~same][:5]}"
        out = _apply(root / "v", root / "a", root / "out", scale=0.5, chunk_elems=64)["w"]
    ref = (f.float() + 0.5 * d).to(dtype)  # between from and to: never overflows
    assert bool(_same_value(out, ref).all())


@settings(max_examples=40, deadline=None, database=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=100),
       st.sampled_from([torch.bfloat16, torch.float16]), st.booleans())
def test_encode_delta_of_any_float32_values(values, dtype, sparse):
    """The reusable encoder: arbitrary float32 deltas stay exact through a 16-bit values dtype."""
    d = torch.tensor(values, dtype=torch.float32)
    enc = encode_delta(d, dtype, sparse)
    decoded = torch.zeros_like(d)
    idx = torch.from_numpy(np.flatnonzero(enc.changed))
    decoded[idx if sparse else torch.arange(d.numel())] = enc.values.float()
    decoded[enc.fix_pos] = enc.fix_hi
    assert bool(_same_value(decoded, d).all())
    assert enc.n_changed == int((d != 0).sum())
    assert enc.values.dtype == dtype and enc.fix_hi.dtype == torch.float32
    assert bool((enc.fix_pos.diff() > 0).all())
    want_fix = d[idx].to(dtype).float() != d[idx]
    assert torch.equal(enc.fix_pos, idx[want_fix]), "fix-ups are exactly the elements the dtype cannot hold"


# ---------------------------------------------------------------- apply to a third model, any α


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", LARGE + HARD)
def test_apply_to_a_third_model_is_the_float32_reference(trio, vector, tmp_path, name, fmt, alpha):
    t = trio(name)
    vec = vector(name, fmt)
    assert VectorCard.read(vec).exact
    target, sft, rl = load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl)
    out = _apply(vec, t.target, tmp_path / "out", scale=alpha, chunk_elems=1000)
    assert_bitwise_equal(out, expected_apply(target, sft, rl, alpha), f"{name} {fmt} α={alpha}")


@pytest.mark.parametrize("name", LARGE)
def test_large_updates_need_fixups_and_reproduce_rl(trio, vector, tmp_path, name):
    """Sign changes make deltas that bf16 cannot hold; they are fix-ups, counted in the card. Their float32
    differences are exact (no two values are 2^15 apart), so SFT + v is RL bit for bit, as a consequence."""
    t = trio(name)
    card = VectorCard.read(vector(name))
    sft, rl = load_tensors(t.sft), load_tensors(t.rl)
    for e in card.tensors:
        d = rl[e.name].float() - sft[e.name].float()
        assert e.fixups == int((d.to(torch.bfloat16).float() != d).sum()), e.name
    assert sum(e.fixups for e in card.tensors) > 0
    assert_bitwise_equal(_apply(vector(name), t.sft, tmp_path / "out"), rl, f"{name} SFT + v")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dense_16_bit_vectors_with_fixups(trio, vector, tmp_path, dtype):
    """Dense in the models' own dtype (bf16) is exact through fix-ups; in another 16-bit dtype it is lossy and
    its card says so."""
    t = trio("llama_large")
    vec = vector("llama_large", "dense", dtype=dtype)
    card = VectorCard.read(vec)
    assert card.exact == (dtype == "bfloat16")
    target, sft, rl = load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl)
    out = _apply(vec, t.target, tmp_path / "out", scale=0.5)
    reference = expected_apply(target, sft, rl, 0.5)
    if card.exact:
        assert sum(e.fixups for e in card.tensors) > 0
        assert_bitwise_equal(out, reference, "dense bf16 α=0.5")
    else:
        assert sum(e.fixups for e in card.tensors) == 0
        assert any(not torch.equal(bits(out[k]), bits(reference[k])) for k in reference)

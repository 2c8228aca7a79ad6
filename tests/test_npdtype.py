"""rvhub._npdtype against torch's own conversions, bit for bit, over every bf16 value and hard float32 cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rvhub._npdtype import bf16_to_f32, f32_to_bf16, from_work, raw_view, to_work


def _torch_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_every_bf16_widens_exactly() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    got = bf16_to_f32(bits)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_narrowing_matches_torch_on_hard_cases() -> None:
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 1 << 32, size=400_000, dtype=np.uint64).astype(np.uint32)
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    halfway = hi | 0x8000  # exact ties: even rule decides
    near = np.concatenate([hi | 0x7FFF, hi | 0x8001, hi | 0x0001, hi | 0xFFFF])
    special = np.array([0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001, 0x80000001,
                        0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0xFFFFFFFF, 0, 0x80000000],
                       dtype=np.uint32)
    x = np.concatenate([random_bits, hi, halfway, near, special]).view(np.float32)
    got = f32_to_bf16(x)
    ref = _torch_bits(x)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("code", ["F16", "F32", "F64"])
def test_round_trip_other_floats_matches_torch(code: str) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(10_000) * 10.0 ** rng.integers(-8, 6, 10_000)).astype(np.float32)
    t = {"F16": torch.float16, "F32": torch.float32, "F64": torch.float64}[code]
    ref = torch.from_numpy(x).to(t).numpy()
    got = from_work(x, code)
    assert got.dtype == ref.dtype and np.array_equal(got.view(np.uint8), ref.view(np.uint8))
    back = to_work(got, code)
    assert np.array_equal(back, torch.from_numpy(ref).to(torch.float64 if code == "F64" else torch.float32).numpy())


def test_raw_view_reads_little_endian_bytes() -> None:
    t = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    raw = raw_view(t.view(torch.uint8).numpy().tobytes(), "BF16")
    assert bf16_to_f32(raw).tolist() == [1.5, -2.0, 3.25]
    with pytest.raises(TypeError):
        from_work(np.zeros(2, dtype=np.float64), "BF16")

"""Exact float conversions on numpy arrays, for the paths that do their arithmetic without torch.

numpy has no bfloat16, so a BF16 tensor is held as its uint16 bit patterns (``RAW_NUMPY["BF16"]``). Widening
(bf16 → float32, f16 → float32, any → float64) is exact. Narrowing rounds once, to nearest with ties to even,
exactly as torch's ``Tensor.to`` does, NaN included (every NaN becomes 0xFFFF, as torch 2.13 on CPU writes it), so
a result computed here is bit-identical to the same float32 arithmetic done in torch.
"""

from __future__ import annotations

import numpy as np

# safetensors dtype code -> the numpy dtype its raw bytes are viewed as
RAW_NUMPY: dict[str, type[np.generic]] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
BF16_NAN = 0xFFFF  # what torch 2.13 on CPU writes for every NaN (checked in tests)


def raw_view(buf: bytes | bytearray | memoryview | np.ndarray, code: str) -> np.ndarray:
    """A 1-D view of little-endian tensor bytes as their raw numpy dtype (no copy)."""
    dt = np.dtype(RAW_NUMPY[code]).newbyteorder("<")
    if isinstance(buf, np.ndarray):
        return buf.view(dt).reshape(-1)
    return np.frombuffer(buf, dtype=dt)


def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bf16 bit patterns (uint16) → float32, exactly (a bf16 is the top half of a float32)."""
    wide = np.empty(bits.shape, dtype=np.uint32) if out is None else out.view(np.uint32)
    np.left_shift(bits, 16, out=wide, dtype=np.uint32)  # one pass: widened and shifted in the ufunc loop
    return wide.view(np.float32)


def _any_nonfinite_f32(u: np.ndarray) -> bool:
    """Whether float32 bit patterns ``u`` (uint32) hold an Inf or NaN, in two reductions and no temporary:
    the positive ones are the largest values read as int32, the negative ones the largest read as uint32."""
    return bool(u.size) and (int(u.view(np.int32).max()) >= 0x7F800000 or int(u.max()) >= 0xFF800000)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns, round to nearest, ties to even; overflow gives ±inf, NaN gives BF16_NAN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bias = np.right_shift(u, 16)
    np.bitwise_and(bias, 1, out=bias)
    bias += 0x7FFF
    bias += u  # wraps only for negative NaN bit patterns, which are overwritten below
    np.right_shift(bias, 16, out=bias)
    out = bias.astype(np.uint16)
    if _any_nonfinite_f32(u):  # rare: the exact NaN test runs only then
        nan = np.isnan(x)
        if nan.any():
            out[nan] = BF16_NAN
    return out


def to_work(raw: np.ndarray, code: str) -> np.ndarray:
    """Raw values of dtype ``code`` → the work dtype (float64 for F64, float32 otherwise), exactly."""
    if code == "BF16":
        return bf16_to_f32(raw)
    if code == "F64":
        return raw.astype(np.float64, copy=False)
    return raw.astype(np.float32, copy=False)


def from_work(x: np.ndarray, code: str) -> np.ndarray:
    """Work values → raw values of dtype ``code``, rounded once (to nearest, ties to even)."""
    if code == "BF16":
        if x.dtype == np.float64:
            raise TypeError("float64 -> bf16 would round twice; narrow through float32 explicitly")
        return f32_to_bf16(x)
    return x.astype(RAW_NUMPY[code], copy=False)


def narrow(x: np.ndarray, code: str) -> np.ndarray:
    """Work values → raw values of ``code``, as torch's ``Tensor.to`` rounds them: float64 goes to a 16-bit
    dtype through float32 (torch converts a double to half or bfloat16 that way)."""
    if x.dtype == np.float64 and code in ("BF16", "F16"):
        x = x.astype(np.float32)
    return from_work(x, code)


def convert(raw: np.ndarray, code: str, out_code: str) -> np.ndarray:
    """Raw values of ``code`` → raw values of ``out_code``, as torch's ``Tensor.to`` converts them."""
    if code == out_code:
        return raw
    if code not in _FLOAT or out_code not in _FLOAT:
        return raw.astype(RAW_NUMPY[out_code])
    return narrow(to_work(raw, code), out_code)


_FLOAT = ("BF16", "F16", "F32", "F64")

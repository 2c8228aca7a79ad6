"""Structural checks of a vector's stored tensors against its card.

A file whose sha256 matches the card can still be wrong in its structure (written by another tool, or
tampered with and re-hashed). The headers (dtype, shape) of every key are checked when a folder is opened,
before anything is decoded or written; what only the data can show (fix-up indices, the mask's popcount) is
checked while decoding, by :class:`ElementChecks`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from .card import TensorEntry
from .errors import CorruptFileError, VectorStructureError
from .sources import open_safetensors

SUFFIXES = ("::mask", "::values", "::fix_index", "::fix_hi", "::fix_lo")
Header = tuple[str, tuple[int, ...]]


def read_headers(files: set[Path]) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """``key -> (dtype, shape, file)`` of every tensor of ``files``, from their headers alone."""
    out: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    for file in sorted(files):
        with open_safetensors(file) as f:
            try:
                for key in f.keys():
                    sl = f.get_slice(key)
                    if key in out:
                        raise CorruptFileError(str(file), f"{key} is also stored in {out[key][2].name}")
                    out[key] = (sl.get_dtype(), tuple(sl.get_shape()), file)
            except SafetensorError as e:
                raise CorruptFileError(str(file), str(e)) from e
    return out


def check_headers(
    path: str, entries: dict[str, TensorEntry], headers: dict[str, Header], sparse: bool, dense_dtype: str
) -> None:
    """Every key's dtype and shape against the card: masks, values counts, dense shapes, fix-up tensors."""
    for key in headers:
        name, sep, suffix = key.partition("::")
        allowed = ("::fix_index", "::fix_hi", "::fix_lo", *(("::mask", "::values") if sparse else ("",)))
        if name not in entries or (sep + suffix) not in allowed:
            raise VectorStructureError(path, key, "is not a key of any tensor the card lists")
    for name, e in entries.items():
        numel = math.prod(e.shape)
        if sparse:
            _expect(path, headers, name + "::mask", ("U8",), (math.ceil(numel / 8),), "a packed bitmask")
            values = (e.source_dtype, "F32") if e.source_dtype != "F32" else ("F32",)
            _expect(path, headers, name + "::values", values, (e.changed,), f"{e.changed} changed elements")
        else:
            _expect(path, headers, name, (dense_dtype,), e.shape, "the tensor's shape")
        fix = [k for k in (name + "::fix_index", name + "::fix_hi", name + "::fix_lo") if k in headers]
        if e.fixups == 0:
            if fix:
                raise VectorStructureError(path, fix[0], "is stored but the card lists no fix-ups for the tensor")
            continue
        what = f"{e.fixups} fix-ups"
        _expect(path, headers, name + "::fix_index", ("I64",), (e.fixups,), what)
        _expect(path, headers, name + "::fix_hi", ("F32", "F64"), (e.fixups,), what)
        if name + "::fix_lo" in headers:
            _expect(path, headers, name + "::fix_lo", (headers[name + "::fix_hi"][0],), (e.fixups,), what)
        if e.fixups > e.changed:
            raise VectorStructureError(path, name + "::fix_index", f"{e.fixups} fix-ups for {e.changed} changed "
                                       "elements; every fix-up is a changed element")


def _expect(
    path: str, headers: dict[str, Header], key: str, dtypes: tuple[str, ...], shape: tuple[int, ...], why: str
) -> None:
    if key not in headers:
        raise VectorStructureError(path, key, "is missing")
    dtype, found = headers[key]
    if dtype not in dtypes:
        raise VectorStructureError(path, key, f"is stored as {dtype}; the card says {' or '.join(dtypes)}")
    if found != shape:
        raise VectorStructureError(path, key, f"has shape {list(found)}; expected {list(shape)} ({why})")


def check_fix_index(path: str, name: str, index: np.ndarray, numel: int) -> None:
    """Fix-up indices: strictly increasing (sorted, no duplicates) flat indices inside the tensor."""
    if not index.size:
        return
    key = name + "::fix_index"
    if index.size > 1 and not bool((index[1:] > index[:-1]).all()):
        raise VectorStructureError(path, key, "is not strictly increasing (unsorted or duplicated indices)")
    lo, hi = int(index[0]), int(index[-1])
    if lo < 0 or hi >= numel:
        raise VectorStructureError(path, key, f"holds index {lo if lo < 0 else hi}, outside the tensor's "
                                   f"{numel} elements")


def check_fix_on_changed(path: str, name: str, index: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The slots of fix-up positions ``pos`` among the changed positions ``index`` of a block; each must be one."""
    slot = np.searchsorted(index, pos)
    ok = slot < index.size
    if not bool(ok.all()) or not np.array_equal(index[slot], pos):
        raise VectorStructureError(path, name + "::fix_index", "names an element the mask marks as unchanged")
    return slot


def check_fix_on_mask(path: str, name: str, bits: np.ndarray, pos: np.ndarray) -> None:
    """Each fix-up position of a block must be an element its mask bits mark as changed."""
    if not bool(bits[pos].all()):
        raise VectorStructureError(path, name + "::fix_index", "names an element the mask marks as unchanged")


def check_mask_count(path: str, name: str, counted: int, changed: int) -> None:
    """The mask's set bits, counted while decoding, against the card's changed count."""
    if counted != changed:
        raise VectorStructureError(path, name + "::mask", f"marks {counted} changed elements; the card and the "
                                   f"values tensor say {changed}")


def check_mask_padding(path: str, name: str, last_byte: np.ndarray, numel: int) -> None:
    """The bits past the tensor's last element in the mask's last byte must be zero."""
    extra = (-numel) % 8
    if extra and last_byte.size and int(last_byte[-1]) >> (8 - extra):
        raise VectorStructureError(path, name + "::mask", "sets bits past the tensor's last element")

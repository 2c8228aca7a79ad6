"""Vector folder formats: how a delta is encoded in safetensors, and how it is read back in chunks.

sparse (default, exact): per tensor ``NAME::mask`` (packed little-endian bitmask of changed elements, uint8)
and ``NAME::values`` (the deltas of the changed elements, in the tensor's own dtype). A difference of two
values of one binary format within a factor of two of each other is exact in that format (Sterbenz), so
almost every delta fits in 16 bits. The rare elements where the stored value would not give ``from + v ==
to`` after rounding (sign changes, values far from zero moved close to it) get ``NAME::fix_index`` (flat
element index), ``NAME::fix_hi`` and ``NAME::fix_lo`` (float32): apply then computes
``(θ + α·hi) + α·lo``, which reproduces ``to`` from ``from`` exactly.

dense: ``NAME`` holds the full delta in float32 (exact, with the same fix-ups) or a smaller dtype (lossy).

Tensors equal in both models are omitted and listed in the card as unchanged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._io import ST_TO_TORCH
from .card import VectorCard
from .errors import CorruptFileError, ExactnessError, VectorFormatError
from .sources import open_safetensors as _open
from .sources import row_blocks

MASK, VALUES, FIX_INDEX, FIX_HI, FIX_LO = "::mask", "::values", "::fix_index", "::fix_hi", "::fix_lo"
VECTOR_STEM = "vector"


def work_dtype(*codes: str) -> torch.dtype:
    """float32 arithmetic, unless a float64 tensor is involved."""
    return torch.float64 if "F64" in codes else torch.float32


@dataclass
class EncodedChunk:
    """One chunk's share of a tensor's encoding. ``fix_pos`` is relative to the chunk start."""

    changed: torch.Tensor  # bool, chunk length
    values: torch.Tensor  # stored dtype: changed elements (sparse) or every element (dense)
    fix_pos: torch.Tensor  # int64
    fix_hi: torch.Tensor  # float32/64
    fix_lo: torch.Tensor


def encode_chunk(
    name: str, f_raw: torch.Tensor, t_raw: torch.Tensor, values_dtype: torch.dtype, sparse: bool, exact: bool
) -> EncodedChunk:
    """Encode ``t_raw − f_raw`` (flat chunks) so that applying it to ``f_raw`` gives ``t_raw``."""
    from .errors import NonFiniteError

    work = torch.float64 if torch.float64 in (f_raw.dtype, t_raw.dtype) else torch.float32
    f = f_raw.to(work)
    t = t_raw.to(work)
    d = t - f
    if not bool(torch.isfinite(d).all()):
        bad_f = int((~torch.isfinite(f)).sum())
        bad_t = int((~torch.isfinite(t)).sum())
        where = "from model" if bad_f else "to model" if bad_t else "the difference overflows"
        raise NonFiniteError(name, where, bad_f or bad_t or int((~torch.isfinite(d)).sum()))
    changed = d != 0
    stored = d.to(values_dtype)
    empty = torch.empty(0, dtype=work)
    fix_pos = torch.empty(0, dtype=torch.int64)
    fix_hi, fix_lo = empty, empty
    if exact:
        recon = f + stored.to(work) if values_dtype != work else f + d
        bad = recon.to(t_raw.dtype) != t_raw
        if bool(bad.any()):
            fix_pos = bad.nonzero().reshape(-1)
            fix_hi = d[fix_pos]
            s1 = f[fix_pos] + fix_hi
            fix_lo = t[fix_pos] - s1
            still = (s1 + fix_lo).to(t_raw.dtype) != t_raw[fix_pos]
            if bool(still.any()):
                raise ExactnessError(name, int(still.sum()))
    values = stored[changed] if sparse else stored
    return EncodedChunk(changed, values, fix_pos, fix_hi, fix_lo)


def pack_bits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask, bitorder="little")


def unpack_bits(packed: np.ndarray, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, count=count, bitorder="little").view(np.bool_))


@dataclass
class DeltaChunk:
    """A chunk of α·v ready to add: ``out = (θ + delta); out[fix_pos] += fix_lo``."""

    delta: torch.Tensor
    fix_pos: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    fix_lo: torch.Tensor = field(default_factory=lambda: torch.empty(0))


class VectorFolder:
    """A vector folder opened for reading: its card and where each stored tensor lives."""

    def __init__(self, folder: Path):
        self.folder = folder
        if not folder.is_dir():
            raise VectorFormatError(str(folder), "no such folder")
        self.card = VectorCard.read(folder)
        self.entries = {e.name: e for e in self.card.tensors}
        self._where: dict[str, Path] = {}
        index = folder / f"{VECTOR_STEM}.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptFileError(str(index), f"invalid index: {e}") from e
            for key, fname in weight_map.items():
                if Path(fname).name != fname:
                    raise CorruptFileError(str(index), f"shard name {fname!r} is not a plain file name")
                self._where[key] = folder / fname
        else:
            single = folder / f"{VECTOR_STEM}.safetensors"
            if not single.is_file():
                raise VectorFormatError(str(folder), f"no {single.name} and no index")
            with _open(single) as f:
                for key in f.keys():
                    self._where[key] = single
        for e in self.card.tensors:
            key = e.name + (MASK if self.card.format == "sparse" else "")
            if key not in self._where:
                raise VectorFormatError(str(folder), f"tensor {e.name} listed in the card is not stored")

    @property
    def sparse(self) -> bool:
        return self.card.format == "sparse"

    def _get(self, key: str) -> torch.Tensor:
        with _open(self._where[key]) as f:
            t: torch.Tensor = f.get_tensor(key)
        return t

    def _fixups(self, name: str, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if name + FIX_INDEX not in self._where:
            e = torch.empty(0, dtype=work)
            return torch.empty(0, dtype=torch.int64), e, e
        return self._get(name + FIX_INDEX), self._get(name + FIX_HI).to(work), self._get(name + FIX_LO).to(work)

    def delta_chunks(
        self, name: str, rows: int, row_elems: int, chunk_elems: int, scale: float, work: torch.dtype
    ) -> Iterator[DeltaChunk]:
        """α·v for ``name`` in the row blocks of a target with ``rows`` rows (zero beyond the vector's rows).

        Blocks are those of :func:`row_blocks` for the target's shape, so they line up with its chunks.
        """
        entry = self.entries[name]
        vrows = entry.shape[0] if entry.shape else 1
        fix_idx, fix_hi, fix_lo = self._fixups(name, work)
        shape = (rows, *entry.shape[1:]) if entry.shape else ()
        blocks = row_blocks(shape, chunk_elems) if entry.shape else [(0, 1)]
        key = name + (MASK if self.sparse else "")
        with contextlib.ExitStack() as stack:
            main = stack.enter_context(_open(self._where[key])).get_slice(key)
            vals = None
            offset = 0
            if self.sparse:
                vals = stack.enter_context(_open(self._where[name + VALUES])).get_slice(name + VALUES)
            for a, b in blocks:
                n = (b - a) * row_elems
                delta = torch.zeros(n, dtype=work)
                end = min(b, vrows)
                if end > a:
                    m = (end - a) * row_elems
                    lo, hi = a * row_elems, end * row_elems
                    if self.sparse:
                        assert vals is not None
                        packed = main[lo // 8 : (hi + 7) // 8].numpy()
                        mask = unpack_bits(packed, m)
                        k = int(mask.sum())
                        v = vals[offset : offset + k].to(work) if k else torch.empty(0, dtype=work)
                        offset += k
                        delta[:m].masked_scatter_(mask, v)
                    else:
                        part = main[a:end] if entry.shape else main[:]
                        delta[:m] = part.reshape(-1).to(work)
                else:
                    lo = hi = a * row_elems
                pos = torch.empty(0, dtype=torch.int64)
                flo = torch.empty(0, dtype=work)
                if fix_idx.numel():
                    i0, i1 = (int(x) for x in torch.searchsorted(fix_idx, torch.tensor([lo, hi])))
                    if i1 > i0:
                        pos = fix_idx[i0:i1] - lo
                        delta[pos] = fix_hi[i0:i1]
                        flo = fix_lo[i0:i1] * scale if scale != 1.0 else fix_lo[i0:i1]
                if scale != 1.0:
                    delta.mul_(scale)
                yield DeltaChunk(delta, pos, flo)


def torch_dtype(code: str) -> torch.dtype:
    return ST_TO_TORCH[code]

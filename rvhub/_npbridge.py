"""Zero-copy bridges between the raw numpy arrays of the torch-free paths and torch tensors.

The torch-free code holds a tensor as its raw values (``_npdtype.RAW_NUMPY``: bf16 as uint16 bit patterns).
Modules that compute in torch (compress, inmemory, algebra, eval, inspect) get the same bytes as a tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def to_torch(raw: np.ndarray, code: str) -> torch.Tensor:
    """The tensor of dtype ``code`` sharing ``raw``'s memory (raw values as :func:`_npdtype.raw_view` gives)."""
    import torch

    from ._io import ST_TO_TORCH

    if code == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw).view(ST_TO_TORCH[code])


def from_torch(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """(raw values sharing a CPU tensor's memory, its dtype code)."""
    import torch

    from ._io import TORCH_TO_ST

    code = TORCH_TO_ST[t.dtype]
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), code
    return t.numpy(), code

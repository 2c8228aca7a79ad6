"""Progress bars for long work: bytes and tensors, on stderr; off with quiet or HF_HUB_DISABLE_PROGRESS_BARS."""

from __future__ import annotations

from typing import Any


class _NoBar:
    """What a disabled bar does: nothing (and without loading huggingface_hub's tqdm for it)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def progress_bar(total_bytes: int, desc: str, enabled: bool, tensors: int) -> Any:
    """A bytes/s bar (huggingface_hub's tqdm honours HF_HUB_DISABLE_PROGRESS_BARS) counting tensors too."""
    if not enabled:
        return _NoBar()
    from huggingface_hub.utils.tqdm import tqdm as _hf_tqdm

    bar = _hf_tqdm(  # type: ignore[no-untyped-call]
        total=total_bytes,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    )
    bar.set_postfix_str(f"0/{tensors} tensors", refresh=False)
    bar.rvhub_tensors = tensors
    bar.rvhub_done = 0
    return bar


def tensor_done(bar: Any, nbytes: int) -> None:
    if isinstance(bar, _NoBar):
        return
    bar.rvhub_done += 1
    bar.set_postfix_str(f"{bar.rvhub_done}/{bar.rvhub_tensors} tensors", refresh=False)
    bar.update(nbytes)

"""A sparse tensor streamed into its shard as it is encoded (mask bytes into their place, values behind them)
gives the same files as one held whole until written, and holds no chunk beyond the writes in flight."""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import folder_snapshot

from rvhub import extract as extract_module
from rvhub._io import SafetensorsFileWriter, ShardedWriter, TensorSpec
from rvhub.extract import extract
from rvhub.formats import RawChunk, TensorEncoder
from rvhub.toy import Trio

RESERVE = 1024


def _tensors() -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    return {
        "a": g.integers(0, 255, 40, dtype=np.uint8),
        "m": g.integers(0, 255, 24, dtype=np.uint8),  # written out of order, by offset
        "v": g.integers(0, 2**16, 30, dtype=np.uint16).view(np.int16),  # length unknown until its end
        "z": g.integers(0, 255, 16, dtype=np.uint8),
    }


def _streamed(folder: Path, max_bytes: int) -> list[str]:
    t = _tensors()
    w = ShardedWriter(folder, "vector", max_bytes, {"format": "x"}, header_reserve=RESERVE)
    w.add(TensorSpec("a", "U8", (40,)), [t["a"]])
    f = w.begin(TensorSpec("m", "U8", (24,)))
    at = f.defer()
    w.begin_open("v", "I16")
    for i in (0, 10, 20):  # the region's pieces between the open tensor's pieces, last one first
        f.write_at(at + 16 - (i * 8) // 10, t["m"][16 - (i * 8) // 10 :][:8])
        f.write(t["v"][i : i + 10])
    assert w.end_open() == TensorSpec("v", "I16", (30,))
    w.add(TensorSpec("z", "U8", (16,)), [t["z"]])
    return w.close()


def _sized(folder: Path, max_bytes: int) -> list[str]:
    t = _tensors()
    w = ShardedWriter(folder, "vector", max_bytes, {"format": "x"}, header_reserve=RESERVE)
    for name, arr in t.items():
        w.add(TensorSpec(name, "I16" if name == "v" else "U8", (arr.size,)), [arr])
    return w.close()


# 1000: one shard; 100: the open tensor overfills the shard holding a and m, and moves to the next one (with z);
# 64: a and m fill the first shard exactly; 50: m alone in a shard, the open tensor moves to a shard it overfills
@pytest.mark.parametrize("max_bytes", [1000, 100, 64, 50])
def test_deferred_and_open_tensors_land_where_sized_ones_would(tmp_path: Path, max_bytes: int) -> None:
    a, b = tmp_path / "streamed", tmp_path / "sized"
    a.mkdir()
    b.mkdir()
    names = _streamed(a, max_bytes)
    assert names == _sized(b, max_bytes)
    assert folder_snapshot(a) == folder_snapshot(b)
    if max_bytes == 100:
        assert len(names) == 3  # 2 shards + index


def test_end_open_needs_whole_elements(tmp_path: Path) -> None:
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", None, reserve=RESERVE)
    w.begin_open("v", "I16")
    w.write(b"abc")
    with pytest.raises(RuntimeError, match="whole number"):
        w.end_open()
    w.abort()


def test_a_file_that_gave_up_its_last_tensor_takes_no_more(tmp_path: Path) -> None:
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", None, reserve=RESERVE)
    w.begin(TensorSpec("a", "U8", (4,)))
    w.write(b"abcd")
    assert w.pop_last() == 8 + RESERVE
    with pytest.raises(RuntimeError, match="no more"):
        w.begin(TensorSpec("b", "U8", (1,)))
    w.close()
    assert (tmp_path / "x.safetensors").stat().st_size == 8 + RESERVE  # the popped bytes are truncated away


def _chunks(n: int, size: int) -> list[RawChunk]:
    g = np.random.default_rng(1)
    out = []
    for _ in range(n):
        changed = g.random(size) < 0.5
        values = g.integers(1, 2**15, int(changed.sum()), dtype=np.uint16).view(np.int16)
        out.append(RawChunk(changed, values.size, values, np.empty(0, np.int64), np.empty(0, np.float32)).pack())
    return out


@pytest.mark.parametrize("stream", [True, False])
def test_streaming_encoder_keeps_no_chunk(tmp_path: Path, stream: bool) -> None:
    n, size = 12, 4096
    w = ShardedWriter(tmp_path, "vector", 1 << 30, header_reserve=RESERVE)
    enc = TensorEncoder(w, "t", (n * size,), "BF16", "BF16", sparse=True, stream=stream)
    alive = []
    for chunk in _chunks(n, size):
        alive.append((weakref.ref(chunk.values), weakref.ref(chunk.changed)))
        enc.add(chunk)
        del chunk
    gc.collect()
    held = sum(v() is not None for v, _ in alive)
    # streamed: only what the writing thread has not written yet (at most two writes in flight)
    assert held <= 2 if stream else held == n
    assert all(c() is None for _, c in alive)  # the unpacked mask is never kept
    enc.finish()
    w.close()


def _buffered_extract(monkeypatch: pytest.MonkeyPatch) -> None:
    """extract with every sparse tensor held whole until written (the encoder's other mode): the reference."""
    def held(*args: Any, **kwargs: Any) -> TensorEncoder:
        return TensorEncoder(*args, **{**kwargs, "stream": False})

    monkeypatch.setattr(extract_module, "TensorEncoder", held)


@pytest.mark.parametrize("name", ["qwen2_hard", "llama_large"])
def test_streamed_extract_is_byte_identical(
    trio: Callable[[str], Trio], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    t = trio(name)
    run = functools.partial(extract, str(t.sft), str(t.rl), progress=False, threads=2)
    moved: list[int] = []
    pop = SafetensorsFileWriter.pop_last

    def counted(self: SafetensorsFileWriter) -> int:
        moved.append(1)
        return pop(self)

    monkeypatch.setattr(SafetensorsFileWriter, "pop_last", counted)
    snaps = {}
    for shard in ("30KB", "2GB"):
        for chunk in (96, 1 << 22):  # every matrix in many chunks, or in one
            out = tmp_path / f"s{shard}{chunk}"
            run(out, chunk_elems=chunk, max_shard_size=shard)
            snaps[shard, chunk, "streamed"] = folder_snapshot(out)
    assert moved  # at 30KB some values overfilled their mask's shard and moved to the next one
    with monkeypatch.context() as m:
        _buffered_extract(m)
        for shard in ("30KB", "2GB"):
            run(tmp_path / f"h{shard}", max_shard_size=shard)
            snaps[shard, 0, "held"] = folder_snapshot(tmp_path / f"h{shard}")
    for (shard, _, _), snap in snaps.items():
        assert snap == snaps[shard, 0, "held"]
    assert len(snaps["30KB", 0, "held"]) > 4  # several shards (+ index, card, README)

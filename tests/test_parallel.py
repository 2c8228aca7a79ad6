"""Chunks on worker threads (rvhub._parallel): results in order, errors where one thread raises them, and
extract/apply outputs byte-identical whatever the number of threads."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import folder_snapshot

from rvhub import _parallel
from rvhub._npdtype import bf16_to_f32, f32_to_bf16
from rvhub._parallel import THREADS_ENV, ordered_map, worker_threads
from rvhub.apply import apply
from rvhub.errors import InvalidOptionError
from rvhub.extract import extract
from rvhub.formats import RawDelta, VectorFolder
from rvhub.toy import Trio


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the machine has 4 CPUs, so that worker threads run even where the tests get one."""
    monkeypatch.setattr(_parallel, "available_cpus", lambda: 4)
    monkeypatch.delenv(THREADS_ENV, raising=False)


def _sleepy(i: int, seen: list[str]) -> Callable[[], int]:
    def task() -> int:
        time.sleep(random.Random(i).random() * 0.01)  # finish out of order
        seen.append(threading.current_thread().name)
        return i * i

    return task


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_come_in_task_order(threads: int) -> None:
    seen: list[str] = []
    assert list(ordered_map((_sleepy(i, seen) for i in range(40)), threads)) == [i * i for i in range(40)]
    on_workers = [n for n in seen if n.startswith("rvhub-chunk")]
    assert len(on_workers) == (40 if threads > 1 else 0)  # one thread runs every task inline


def test_first_error_in_task_order_wins() -> None:
    def task(i: int) -> Callable[[], int]:
        def run() -> int:
            if i == 7:
                time.sleep(0.05)  # the later failure finishes first
                raise KeyError("task 7")
            if i == 9:
                raise ValueError("task 9")
            return i

        return run

    got: list[int] = []
    with pytest.raises(KeyError, match="task 7"):
        for r in ordered_map((task(i) for i in range(20)), 3):
            got.append(r)
    assert got == list(range(7))


def test_error_pulling_a_task_comes_after_the_tasks_before_it() -> None:
    def tasks() -> Iterator[Callable[[], int]]:
        for i in range(5):
            yield lambda i=i: i  # type: ignore[misc]
        raise LookupError("the sixth task cannot be made")

    got: list[int] = []
    with pytest.raises(LookupError):
        for r in ordered_map(tasks(), 2, ahead=10):
            got.append(r)
    assert got == [0, 1, 2, 3, 4]


def test_closing_early_waits_for_started_tasks() -> None:
    started: list[int] = []

    def task(i: int) -> Callable[[], int]:
        def run() -> int:
            started.append(i)
            time.sleep(0.01)
            return i

        return run

    results = ordered_map((task(i) for i in range(100)), 2, ahead=3)
    assert next(results) == 0
    results.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("rvhub-chunk")]
    assert len(started) <= 6  # only the window was ever started


def test_worker_threads(monkeypatch: pytest.MonkeyPatch, four_cpus: None) -> None:
    assert worker_threads() == 4
    assert worker_threads(2) == 2
    assert worker_threads(64) == 4  # never more than the CPUs
    monkeypatch.setenv(THREADS_ENV, "1")
    assert worker_threads() == 1
    assert worker_threads(3) == 3  # an explicit request wins over the environment
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(InvalidOptionError, match=THREADS_ENV):
        worker_threads()
    with pytest.raises(InvalidOptionError):
        worker_threads(0)


# ------------------------------------------------------------------ byte-identical outputs


@pytest.mark.parametrize("name", ["qwen2_hard", "qwen2_large", "llama_large"])
@pytest.mark.parametrize("fmt", ["sparse", "dense"])
def test_extract_and_apply_do_not_depend_on_threads(
    trio: Callable[[str], Trio], tmp_path: Path, name: str, fmt: str, four_cpus: None
) -> None:
    t = trio(name)
    # 96-element chunks: every matrix spans several chunks, so chunks of one tensor run on different threads
    vectors, outputs = [], []
    for threads in (1, 2, 4):
        vec = tmp_path / f"v{threads}"
        r = extract(str(t.sft), str(t.rl), vec, format=fmt, progress=False, chunk_elems=96,  # type: ignore[arg-type]
                    threads=threads)
        vectors.append(folder_snapshot(vec))
        for scale in (1.0, 0.5, -1.7):
            out = tmp_path / f"o{threads}-{scale}"
            apply(vec, str(t.target), out, scale=scale, progress=False, chunk_elems=96, threads=threads)
            outputs.append((scale, folder_snapshot(out)))
    assert vectors[0] == vectors[1] == vectors[2]
    assert fmt == "dense" or r.fixups > 0  # the fix-up paths ran (dense float32 needs none)
    by_scale: dict[float, list[dict[str, bytes]]] = {}
    for scale, snap in outputs:
        by_scale.setdefault(scale, []).append(snap)
    for snaps in by_scale.values():
        assert snaps[0] == snaps[1] == snaps[2]


def test_threads_env_is_read(trio: Callable[[str], Trio], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(InvalidOptionError, match=THREADS_ENV):
        extract(str(trio("qwen2_plain").sft), str(trio("qwen2_plain").rl), tmp_path / "v", progress=False)
    assert not (tmp_path / "v").exists()


# ------------------------------------------------------------------ apply's fix-ups without a search


def _bf16(x: np.ndarray) -> np.ndarray:
    return f32_to_bf16(x.astype(np.float32))


@pytest.mark.parametrize("scale", [1.0, 0.5, -1.0, 1.7])
def test_fixups_on_zero_add_as_the_searched_path(scale: float) -> None:
    """A sparse chunk whose fix-ups sit on stored zeros: adding them after the write (fix_on_zero) gives the
    bits of adding them into the changed elements first (the search by position), ±0 targets included."""
    rng = np.random.default_rng(0)
    n = 4096
    target = _bf16(rng.normal(0, 0.02, n))
    target[:64] = 0x8000  # −0
    target[64:128] = 0
    index = np.sort(rng.choice(n, 1500, replace=False))
    index[:40] = np.arange(40)  # some changed elements on the signed zeros
    index = np.unique(index)
    values = bf16_to_f32(_bf16(rng.normal(0, 1e-3, index.size)))
    fix_slot = np.sort(rng.choice(index.size, 300, replace=False))
    fix_slot[:10] = np.arange(10)
    fix_slot = np.unique(fix_slot)
    values[fix_slot] = 0.0
    fix_pos = index[fix_slot]
    fix_lo = rng.normal(0, 1e-3, fix_slot.size).astype(np.float32)
    s = np.float32(scale)
    searched = RawDelta(index, values * s, fix_pos, fix_lo * s).apply_raw(target.copy(), "BF16", "F32")
    on_zero = RawDelta(index, values * s, fix_pos, fix_lo * s, True).apply_raw(target.copy(), "BF16", "F32")
    np.testing.assert_array_equal(on_zero, searched)
    # and both are the one-rounding reference: widen, add each changed element's delta, round once
    delta = np.zeros(n, np.float32)
    delta[index] = values * s
    delta[fix_pos] = fix_lo * s
    reference = target.copy()
    reference[index] = f32_to_bf16(bf16_to_f32(target)[index] + delta[index])
    np.testing.assert_array_equal(on_zero, reference)


def test_vector_fixups_are_marked_on_zero(vector: Callable[..., Path]) -> None:
    vec = VectorFolder(vector("qwen2_hard"))
    chunks = [c for name in vec.entries for c in vec.delta_chunks_np(name, vec.entries[name].shape[0], 1 << 22,
                                                                        1.0, "F32")]
    fixed = [c for c in chunks if c.fix_pos.size]
    assert fixed and all(c.fix_on_zero for c in fixed)

"""combine --method sum (rvhub._combine_sum) against a plain dense float32 reference computed here, on sparse and
dense inputs mixed, with tensors cut into many row blocks, on one thread and on two."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tensors, write_model
from safetensors import safe_open

import rvhub._combine_sum as combine_sum
from rvhub.algebra import combine
from rvhub.card import VectorCard
from rvhub.formats import VectorFolder
from rvhub.toy import plant_sparse_delta

TINY_CHUNK = 64  # elements per row block: every tensor of the tiny models spans many blocks


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trio, vector):
    """Vectors of one `from` model: sparse v1 = RL − SFT, dense v2 = TARGET − SFT, sparse v3 = RL2 − SFT; and the
    hard trio's vector (fix-ups) in both formats."""
    from rvhub.extract import extract

    t = trio("qwen2_plain")
    root = tmp_path_factory.mktemp("combine-sum")
    rl2 = plant_sparse_delta(t.sft, root / "rl2", seed=7, fraction=0.4)
    v2, v3 = root / "v2", root / "v3"
    extract(str(t.sft), str(t.target), v2, format="dense", progress=False)
    extract(str(t.sft), str(rl2), v3, progress=False)
    return {"v1": vector("qwen2_plain"), "v2": v2, "v3": v3, "hard": vector("qwen2_hard"),
            "hard_dense": vector("qwen2_hard", "dense")}


def reference(vectors: list[Path], weights: list[float], alpha: float) -> dict[str, np.ndarray]:
    """α·(((w₁·v₁) + w₂·v₂) + …) in float32, each input decoded whole (a tensor it does not store is zero)."""
    folders = [VectorFolder(v) for v in vectors]
    names = sorted({n for f in folders for n in f.entries} | set(VectorCard.read(vectors[0]).unchanged))
    out = {}
    for name in names:
        shape = next((f.entries[name].shape for f in folders if name in f.entries), None)
        acc = None
        for f, w in zip(folders, weights, strict=True):
            work = "F64" if any(g.entries[name].source_dtype == "F64" for g in folders if name in g.entries) else "F32"
            d = f.dense_np(name, work) if name in f.entries else np.zeros(shape or (0,), dtype=np.float32)
            term = d * d.dtype.type(w)
            acc = term if acc is None else acc + term
        assert acc is not None
        out[name] = acc * acc.dtype.type(alpha)
    return out


def assert_is(out: Path, expected: dict[str, np.ndarray]) -> None:
    """The vector at ``out`` decodes to ``expected`` bit for bit (±0 alike) and stores exactly its nonzeros."""
    vec = VectorFolder(out)
    card = VectorCard.read(out)
    assert set(vec.entries) | set(card.unchanged) == set(expected)
    for name, want in expected.items():
        nonzero = int(np.count_nonzero(want))
        if name not in vec.entries:
            assert nonzero == 0 and name in card.unchanged, name
            continue
        got = vec.dense_np(name, "F64" if want.dtype == np.float64 else "F32")
        assert got.dtype == want.dtype and got.shape == want.shape, name
        bits = np.dtype(f"u{want.dtype.itemsize}")
        same = (got + want.dtype.type(0)).view(bits) == (want + want.dtype.type(0)).view(bits)
        assert same.all(), f"{name}: {int((~same).sum())} elements differ, first at {np.flatnonzero(~same)[0]}"
        assert vec.entries[name].changed == nonzero, name


CASES = {
    "sparse+dense+sparse": (["v1", "v2", "v3"], [1.0, -0.5, 0.25], 1.7),
    "fixups, sparse+dense": (["hard", "hard_dense"], [1.0, -0.375], -0.6),
    "negation": (["v3"], [-1.0], 1.0),
    "float32 values": (["v1"], [0.1], 1.0),  # most of 0.1·v are not bf16 values: stored in float32
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_sum_is_the_dense_float32_reference_in_many_blocks(inputs, tmp_path, monkeypatch, case, threads):
    names, weights, alpha = CASES[case]
    monkeypatch.setattr(combine_sum, "STREAM_CHUNK_ELEMS", TINY_CHUNK)
    monkeypatch.setenv("RVHUB_THREADS", str(threads))
    vectors = [inputs[n] for n in names]
    combine(vectors, tmp_path / "c", weights=weights, scale=alpha, progress=False)
    assert_is(tmp_path / "c", reference(vectors, weights, alpha))


def _values_dtypes(folder: Path) -> set[str]:
    with safe_open(str(folder / "vector.safetensors"), "np") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("::values")}


def test_values_are_stored_in_the_smaller_of_the_two_dtypes(inputs, tmp_path):
    combine([inputs["v1"]], tmp_path / "tenth", weights=[0.1], progress=False)
    assert _values_dtypes(tmp_path / "tenth") == {"F32"}
    assert sum(e.fixups for e in VectorCard.read(tmp_path / "tenth").tensors) == 0
    combine([inputs["v1"], inputs["v3"]], tmp_path / "sum", progress=False)
    assert _values_dtypes(tmp_path / "sum") == {"BF16"}


def test_a_sum_that_cancels_stores_nothing(inputs, tmp_path):
    combine([inputs["v2"], inputs["v2"]], tmp_path / "c", weights=[1.0, -1.0], progress=False)
    card = VectorCard.read(tmp_path / "c")
    assert card.tensors == [] and set(card.unchanged) == set(reference([inputs["v2"]], [1.0], 1.0))


def test_the_bytes_do_not_depend_on_block_size_or_threads(inputs, tmp_path, monkeypatch):
    vectors = [inputs["hard"], inputs["hard_dense"]]

    def run(out: Path, chunk: int, threads: int) -> str:
        monkeypatch.setattr(combine_sum, "STREAM_CHUNK_ELEMS", chunk)
        monkeypatch.setenv("RVHUB_THREADS", str(threads))
        combine(vectors, out, weights=[0.5, 1.25], scale_patterns=["mlp=2"], progress=False)
        return hashlib.sha256((out / "vector.safetensors").read_bytes()).hexdigest()

    assert run(tmp_path / "a", combine_sum.STREAM_CHUNK_ELEMS, 1) == run(tmp_path / "b", TINY_CHUNK, 2) \
        == run(tmp_path / "c", 8 * TINY_CHUNK + 8, 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_an_overflowing_sum_is_refused_and_leaves_no_output(inputs, tmp_path, monkeypatch, threads):
    from rvhub.errors import NonFiniteError

    monkeypatch.setenv("RVHUB_THREADS", str(threads))
    with pytest.raises(NonFiniteError, match="overflows"):
        combine([inputs["v1"], inputs["v3"]], tmp_path / "c", weights=[3e38, 1.0], scale=3e38, progress=False)
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_sum_of_fp16_fp32_fp64_vectors_is_the_dense_reference(trio, tmp_path, monkeypatch, dtype):
    """The other dtypes take the general encoding (fp16 values with fix-ups; fp32 and fp64 stored as they are)."""
    import torch

    from rvhub.extract import extract

    t = trio("qwen2_large")
    conv = {role: write_model(getattr(t, role), tmp_path / role, {k: v.to(getattr(torch, dtype)) for k, v in
                                                                 load_tensors(getattr(t, role)).items()})
            for role in ("sft", "rl", "target")}
    planted = plant_sparse_delta(t.sft, tmp_path / "planted", seed=3, fraction=0.3)
    rl2 = write_model(planted, tmp_path / "rl2", {k: v.to(getattr(torch, dtype)) for k, v in
                                                   load_tensors(planted).items()})
    vectors = [tmp_path / "v1", tmp_path / "v2", tmp_path / "v3"]
    for out, to, fmt in zip(vectors, (conv["rl"], rl2, conv["target"]), ("sparse", "sparse", "dense"), strict=True):
        extract(str(conv["sft"]), str(to), out, format=fmt, progress=False)
    monkeypatch.setattr(combine_sum, "STREAM_CHUNK_ELEMS", 8 * TINY_CHUNK)
    weights = [1.0, 0.3, -2.5]
    combine(vectors, tmp_path / "c", weights=weights, scale=0.7, progress=False)
    assert_is(tmp_path / "c", reference(vectors, weights, 0.7))

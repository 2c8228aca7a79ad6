"""extract and apply of local folders compute in numpy, without torch: the same bytes as the float32 torch
reference, for bf16, fp16 and fp32 models, tied and untied, sparse and dense, any α; and torch is never
imported by either command (each runs in a fresh interpreter, and the modules loaded at its end are listed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_bitwise_equal, expected_apply, load_tensors, run_cli_imports, write_model

from rvhub.apply import apply
from rvhub.extract import extract
from rvhub.formats import VectorFolder
from rvhub.toy import Trio

HEAVY = ("torch", "transformers", "peft", "lm_eval")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALPHAS = [0.5, -1.0, 1.7]
TRIOS = ["qwen2_large", "llama_large"]  # tied / untied; 20% of elements moved by N(0, 5% rms), sign changes


def _run(tmp_path: Path, *args: object) -> dict[str, object]:
    heavy, _ = run_cli_imports(tmp_path / "modules.json", HEAVY, *args)
    return {"heavy": heavy}


@pytest.mark.parametrize("fmt", ["sparse", "dense"])
def test_extract_and_apply_do_not_import_torch(trio, tmp_path, fmt):
    t = trio("qwen2_large")
    vec, out = tmp_path / "vec", tmp_path / "out"
    result = _run(tmp_path, "extract", "--from", t.sft, "--to", t.rl, "-o", vec, "--format", fmt, "--quiet")
    assert result["heavy"] == [], f"rvhub extract imported {result['heavy']}"
    result = _run(tmp_path, "apply", vec, "--base", t.target, "-o", out, "--scale", "0.5", "--quiet")
    assert result["heavy"] == [], f"rvhub apply imported {result['heavy']}"
    target, sft, rl = load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl)
    assert_bitwise_equal(load_tensors(out), expected_apply(target, sft, rl, 0.5), f"{fmt} (CLI)")


def test_combine_sum_does_not_import_torch(vector, tmp_path):
    """combine --method sum computes in numpy: the result decodes to α·(w₁v₁ + w₂v₂) in float32, exactly, and
    torch stays out."""
    a, b = vector("qwen2_large"), vector("qwen2_large", "dense")
    result = _run(tmp_path, "combine", a, b, "--weights", "1,-0.5", "--scale", "1.7", "-o", tmp_path / "c", "--quiet")
    assert result["heavy"] == [], f"rvhub combine imported {result['heavy']}"
    va, vb, vc = VectorFolder(a), VectorFolder(b), VectorFolder(tmp_path / "c")
    for n in vb.entries:
        want = (va.dense(n) if n in va.entries else torch.zeros(vb.entries[n].shape)) + vb.dense(n) * -0.5
        got = vc.dense(n) if n in vc.entries else torch.zeros_like(want)
        assert_bitwise_equal({n: got}, {n: want * 1.7}, "combine sum")


@pytest.fixture(scope="module")
def typed(trio: Callable[[str], Trio], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Trio]:
    """``typed(trio, dtype)``: the trio with every float tensor converted to ``dtype`` (exactly for fp32)."""
    built: dict[tuple[str, str], Trio] = {}

    def get(name: str, dtype: str) -> Trio:
        if (name, dtype) not in built:
            t = trio(name)
            if dtype == "bf16":
                built[name, dtype] = t
            else:
                root = tmp_path_factory.mktemp(f"{name}-{dtype}")
                conv = {
                    role: write_model(getattr(t, role), root / role,
                                      {k: v.to(DTYPES[dtype]) for k, v in load_tensors(getattr(t, role)).items()})
                    for role in ("sft", "rl", "target")
                }
                built[name, dtype] = Trio(conv["sft"], conv["rl"], conv["target"])
        return built[name, dtype]

    return get


@pytest.fixture(scope="module")
def vectors(typed: Callable[[str, str], Trio], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    built: dict[tuple[str, ...], Path] = {}

    def get(name: str, dtype: str, fmt: str, dense_dtype: str | None = None) -> Path:
        key = (name, dtype, fmt, str(dense_dtype))
        if key not in built:
            t = typed(name, dtype)
            out = tmp_path_factory.mktemp("np-vec") / "v"
            extract(str(t.sft), str(t.rl), out, format=fmt, dtype=dense_dtype, progress=False, chunk_elems=1000)  # type: ignore[arg-type]
            built[key] = out
        return built[key]

    return get


@pytest.mark.parametrize("fmt", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", TRIOS)
def test_decoded_vector_is_the_float32_difference(typed, vectors, name, dtype, fmt):
    t = typed(name, dtype)
    sft, rl = load_tensors(t.sft), load_tensors(t.rl)
    folder = VectorFolder(vectors(name, dtype, fmt))
    for n in folder.entries:
        assert_bitwise_equal({n: folder.dense(n)}, {n: rl[n].float() - sft[n].float()}, f"{name} {dtype} {fmt}")


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("fmt", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", TRIOS)
def test_apply_is_the_float32_reference(typed, vectors, tmp_path, name, dtype, fmt, alpha):
    t = typed(name, dtype)
    target, sft, rl = load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl)
    apply(vectors(name, dtype, fmt), str(t.target), tmp_path / "out", scale=alpha, progress=False, chunk_elems=1000)
    assert_bitwise_equal(load_tensors(tmp_path / "out"), expected_apply(target, sft, rl, alpha),
                         f"{name} {dtype} {fmt} α={alpha}")


@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16"])
def test_apply_to_another_output_dtype_rounds_once(typed, vectors, tmp_path, out_dtype):
    t = typed("llama_large", "fp32")
    target, sft, rl = load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl)
    apply(vectors("llama_large", "fp32", "sparse"), str(t.target), tmp_path / "out", scale=1.7, dtype=out_dtype,
          progress=False, chunk_elems=1000)
    want = expected_apply(target, sft, rl, 1.7, out_dtype=getattr(torch, out_dtype))
    assert_bitwise_equal(load_tensors(tmp_path / "out"), want, out_dtype)


def test_lossy_dense_vector_rounds_the_delta_once(typed, vectors, tmp_path):
    """``--format dense --dtype bfloat16`` of fp32 models: each delta is bf16(d), applied in float32."""
    t = typed("qwen2_large", "fp32")
    target, sft, rl = load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl)
    vec = vectors("qwen2_large", "fp32", "dense", "bfloat16")
    apply(vec, str(t.target), tmp_path / "out", scale=-1.0, progress=False, chunk_elems=1000)
    want = {n: (x.float() + -1.0 * (rl[n].float() - sft[n].float()).to(torch.bfloat16).float()).to(x.dtype)
            for n, x in target.items()}
    assert_bitwise_equal(load_tensors(tmp_path / "out"), want, "dense bf16")


def test_models_of_two_dtypes_give_the_float32_difference(typed, tmp_path):
    """from fp32, to bf16: the values are stored in float32, and decode to fl32(to) − fl32(from)."""
    a, b = typed("llama_large", "fp32"), typed("llama_large", "bf16")
    extract(str(a.sft), str(b.rl), tmp_path / "v", progress=False, chunk_elems=1000)
    sft, rl = load_tensors(a.sft), load_tensors(b.rl)
    folder = VectorFolder(tmp_path / "v")
    for n in folder.entries:
        assert_bitwise_equal({n: folder.dense(n)}, {n: rl[n].float() - sft[n]}, "fp32 → bf16")


@pytest.mark.parametrize("code", ["BF16", "F16"])
def test_finite_check_of_16_bit_patterns_is_exact(code):
    """The fast test (two reductions) finds every Inf/NaN pattern, alone among finite values, and none else."""
    import numpy as np

    from rvhub.errors import NonFiniteError
    from rvhub.formats import check_finite_raw

    every = np.arange(1 << 16, dtype=np.uint16)
    exp = 0x7F80 if code == "BF16" else 0x7C00
    bad = (every & exp) == exp
    finite = every[~bad]
    check_finite_raw("w", finite, code, "test")
    for pattern in every[bad]:
        with pytest.raises(NonFiniteError) as e:
            check_finite_raw("w", np.append(finite[::97], pattern), code, "test")
        assert e.value.count == 1

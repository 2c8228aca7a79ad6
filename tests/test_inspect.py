"""inspect: norms, changed fraction, relative size, cosine, sign agreement, Jaccard and LoRA spectra against
float64 computations from the models themselves."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_tensors, run_cli

from rvhub.errors import MissingExtraError, ShapeMismatchError
from rvhub.extract import extract
from rvhub.inspect import inspect_vector, layer_of, module_type, render
from rvhub.toy import plant_sparse_delta


def deltas(to: Path, frm: Path) -> dict[str, torch.Tensor]:
    a, b = load_tensors(to), load_tensors(frm)
    return {k: (a[k].float() - b[k].float()).double().reshape(-1) for k in b}


@pytest.fixture(scope="module")
def two(tmp_path_factory, trio, vector):
    t = trio("qwen2_plain")
    root = tmp_path_factory.mktemp("inspect")
    rl2 = plant_sparse_delta(t.sft, root / "rl2", seed=77, fraction=0.3)
    v2 = root / "v2"
    extract(str(t.sft), str(rl2), v2, progress=False)
    return t, vector("qwen2_plain"), v2, deltas(t.rl, t.sft), deltas(rl2, t.sft)


def test_layer_and_module_type_of_a_name():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "12"
    assert module_type("model.layers.12.mlp.up_proj.weight") == "mlp.up_proj.weight"
    assert layer_of("model.embed_tokens.weight") == "-"
    assert module_type("model.norm.weight") == "model.norm.weight"


def test_one_vector_norms_changed_fraction_and_relative_size_match_float64(two):
    t, v1, _, d1, _ = two
    r = inspect_vector(v1)
    sft = {k: v.double().reshape(-1) for k, v in load_tensors(t.sft).items()}
    for name, s in r.tensors.items():
        assert s["norm"] == pytest.approx(float(d1[name].norm()), rel=1e-12)
        assert s["changed_fraction"] == int((d1[name] != 0).sum()) / d1[name].numel()
        if sft[name].norm() > 0:
            assert s["relative_norm"] == pytest.approx(float(d1[name].norm() / sft[name].norm()), rel=1e-12)
        else:  # a zero-initialised bias: no relative size
            assert s["relative_norm"] is None
    layer0 = [n for n in r.tensors if ".layers.0." in n]
    assert r.layers["0"]["norm"] == pytest.approx(math.sqrt(sum(float(d1[n].square().sum()) for n in layer0)))
    q = [n for n in r.tensors if n.endswith("q_proj.weight")]
    assert r.modules["self_attn.q_proj.weight"]["norm"] == pytest.approx(
        math.sqrt(sum(float(d1[n].square().sum()) for n in q)))
    total = math.sqrt(sum(float(d1[n].square().sum()) for n in r.tensors))
    assert r.total["norm"] == pytest.approx(total, rel=1e-12)
    assert r.from_model is not None and "cosine" not in r.total
    assert "layer" in render(r) and "total" in render(r)


def test_two_vectors_cosine_ratio_sign_agreement_and_jaccard_match_float64(two):
    _, v1, v2, d1, d2 = two
    r = inspect_vector(v1, v2)
    for name, s in r.tensors.items():
        a, b = d1[name], d2[name]
        both = (a != 0) & (b != 0)
        union = (a != 0) | (b != 0)
        assert s["cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-9, abs=1e-12)
        assert s["norm_ratio"] == pytest.approx(float(a.norm() / b.norm()), rel=1e-12)
        assert s["sign_agreement"] == int((torch.sign(a) == torch.sign(b))[both].sum()) / int(both.sum())
        assert s["jaccard"] == int(both.sum()) / int(union.sum())
    same = inspect_vector(v1, v1)
    assert same.total["cosine"] == pytest.approx(1.0) and same.total["jaccard"] == 1.0
    assert same.total["sign_agreement"] == 1.0 and same.total["norm_ratio"] == pytest.approx(1.0)


def test_lora_spectrum_is_the_singular_values_of_the_delta(lowrank, tmp_path):
    from rvhub.compress import compress

    trio, vec = lowrank("llama")
    compress(vec, tmp_path / "a", rank=3, exact=True, progress=False)
    r = inspect_vector(tmp_path / "a")
    assert r.format == "lora" and r.spectrum
    d = deltas(trio.rl, trio.sft)
    shapes = {k: v.shape for k, v in load_tensors(trio.sft).items()}
    for m in r.spectrum:
        ref = torch.linalg.svdvals(d[m.name].reshape(shapes[m.name]))[: m.rank]
        assert m.singular_values == pytest.approx(ref.tolist(), rel=1e-4)
        assert sum(m.energy) == pytest.approx(1.0)


def test_plot_writes_a_png_and_a_missing_matplotlib_says_which_extra(two, tmp_path, monkeypatch):
    _, v1, v2, *_ = two
    r = inspect_vector(v1, v2, plot=tmp_path / "p.png")
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and r.plot == str(tmp_path / "p.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'rvhub\[plot\]'"):
        inspect_vector(v1, plot=tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


def test_vectors_of_other_shapes_are_refused(two, vector):
    _, v1, *_ = two
    with pytest.raises(ShapeMismatchError):
        inspect_vector(v1, vector("qwen2_wide"))


def test_cli_inspect_json(two):
    _, v1, v2, *_ = two
    done = run_cli("inspect", v1, v2, "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert set(r["layers"]) == {"0", "1", "-"} and -1 <= r["total"]["cosine"] <= 1
    human = run_cli("inspect", v1)
    assert human.returncode == 0 and "module type" in human.stdout


def test_a_tensor_unchanged_in_one_vector_compares_against_zeros(two, tmp_path):
    t, v1, *_ = two
    dense = tmp_path / "dense"
    extract(str(t.sft), str(t.target), dense, format="dense", progress=False)  # every tensor, norms too
    r = inspect_vector(v1, dense)
    norms = [n for n in r.tensors if n.endswith("norm.weight")]
    assert norms and not r.only_in_vector and not r.only_in_other
    for n in norms:  # the plain trio's RL leaves the norms as they are
        s = r.tensors[n]
        assert s["norm"] == 0 and s["other_norm"] > 0 and s["jaccard"] == 0 and s["cosine"] is None

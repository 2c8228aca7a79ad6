"""combine (sum, ties, dare) and --scale-pattern, against float32 references computed here from the models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_bitwise_equal, copy_folder, load_tensors, run_cli, write_model

from rvhub.algebra import ScalePatterns, combine, dare_keep, ties_trim
from rvhub.apply import apply
from rvhub.card import VectorCard
from rvhub.errors import (
    IncompatibleInputsError,
    IntegrityError,
    InvalidOptionError,
    ShapeMismatchError,
    VectorFormatError,
)
from rvhub.extract import extract
from rvhub.formats import VectorFolder
from rvhub.toy import plant_sparse_delta

NORM = "model.norm.weight"


def models(folder: Path) -> dict[str, torch.Tensor]:
    return load_tensors(folder)


def delta(to: Path, frm: Path) -> dict[str, torch.Tensor]:
    """θ_to − θ_from in float32, every tensor: the reference for a decoded exact vector."""
    a, b = models(to), models(frm)
    return {k: a[k].float() - b[k].float() for k in b}


def decoded(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a vector folder decoded (zeros for those its card lists as unchanged)."""
    vec = VectorFolder(folder)
    out = {name: vec.dense(name) for name in vec.entries}
    return out


def plus_zero(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """x + 0.0: −0.0 becomes +0.0 (an unstored zero decodes as +0.0), every other value stays as it is."""
    return {k: v + 0.0 for k, v in d.items()}


def assert_combination(out: Path, expected: dict[str, torch.Tensor]) -> None:
    got = decoded(out)
    full = {k: got.get(k, torch.zeros_like(v)) for k, v in expected.items()}
    assert not set(got) - set(expected)
    assert_bitwise_equal(plus_zero(full), plus_zero(expected), str(out))


@pytest.fixture(scope="module")
def pair(tmp_path_factory, trio, vector):
    """v1 = RL − SFT (sparse), v2 = TARGET − SFT (dense), v3 = RL2 − SFT (sparse): one `from` model."""
    t = trio("qwen2_plain")
    root = tmp_path_factory.mktemp("algebra")
    rl2 = plant_sparse_delta(t.sft, root / "rl2", seed=99, fraction=0.3)
    v2 = root / "v2"
    extract(str(t.sft), str(t.target), v2, format="dense", progress=False)
    v3 = root / "v3"
    extract(str(t.sft), str(rl2), v3, progress=False)
    return t, vector("qwen2_plain"), v2, v3, rl2


# ---------------------------------------------------------------- sum


def test_weighted_sum_of_sparse_and_dense_vectors_is_the_float32_formula_bit_for_bit(pair, tmp_path):
    t, v1, v2, v3, rl2 = pair
    d1, d2, d3 = delta(t.rl, t.sft), delta(t.target, t.sft), delta(rl2, t.sft)
    w = [1.0, 0.5, -0.3]
    res = combine([v1, v2, v3], tmp_path / "c", weights="1,0.5,-0.3", progress=False)
    w32 = [torch.tensor(x, dtype=torch.float32) for x in w]
    expected = {k: ((d1[k] * w32[0] + d2[k] * w32[1]) + d3[k] * w32[2]) for k in d1}
    assert_combination(tmp_path / "c", expected)
    card = VectorCard.read(tmp_path / "c")
    assert card.schema_version == 3 and card.formula == "combination" and card.format == "sparse"
    prov = card.provenance
    assert prov is not None and prov.method == "sum" and [i.weight for i in prov.inputs] == w
    assert prov.expression == "1·v1 + 0.5·v2 − 0.3·v3"
    assert [i.ref for i in prov.inputs] == [str(v1), str(v2), str(v3)]
    assert prov.inputs[0].card_sha256 == __import__("hashlib").sha256((v1 / "rvhub.json").read_bytes()).hexdigest()
    assert res.changed_elements == sum(int((e != 0).sum()) for e in expected.values())
    assert card.exact
    readme = (tmp_path / "c" / "README.md").read_text()
    assert "# Combined reasoning vector: 1·v1 + 0.5·v2 − 0.3·v3" in readme and "## Provenance" in readme
    assert VectorCard.from_readme(readme) == card


def test_negation_is_minus_v(pair, tmp_path):
    t, v1, *_ = pair
    combine([v1], tmp_path / "neg", weights=[-1.0], progress=False)
    assert_combination(tmp_path / "neg", {k: -v for k, v in delta(t.rl, t.sft).items()})
    assert VectorCard.read(tmp_path / "neg").tensors[0].fixups == 0  # −x is exact in bf16


def test_combine_then_apply_is_target_plus_the_sum_rounded_once(pair, tmp_path):
    t, v1, v2, v3, rl2 = pair
    d1, d3 = delta(t.rl, t.sft), delta(rl2, t.sft)
    combine([v1, v3], tmp_path / "c", weights=[1.0, 0.5], progress=False)
    apply(tmp_path / "c", str(t.target), tmp_path / "out", progress=False)
    half = torch.tensor(0.5)
    tgt = models(t.target)
    expected = {k: (v.float() + (d1[k] + d3[k] * half)).to(v.dtype) if k in d1 else v for k, v in tgt.items()}
    assert_bitwise_equal(plus_zero(models(tmp_path / "out")), plus_zero(expected))


def test_dare_with_density_one_is_sum(pair, tmp_path):
    _, v1, _, v3, _ = pair
    combine([v1, v3], tmp_path / "s", weights=[1, 2], progress=False)
    combine([v1, v3], tmp_path / "d", weights=[1, 2], method="dare", density=1.0, seed=5, progress=False)
    assert_bitwise_equal(decoded(tmp_path / "d"), decoded(tmp_path / "s"))
    combine([v1, v3], tmp_path / "sh", weights=[1, 2], max_shard_size="20KB", progress=False)
    assert (tmp_path / "sh" / "vector.safetensors.index.json").is_file()
    assert_bitwise_equal(decoded(tmp_path / "sh"), decoded(tmp_path / "s"))


# ---------------------------------------------------------------- ties and dare on hand-made tensors


@pytest.fixture(scope="module")
def hand(tmp_path_factory, trio):
    """Vectors whose only change is in model.norm.weight (64 elements): from = zeros there, to_i = values."""
    t = trio("qwen2_plain")
    root = tmp_path_factory.mktemp("hand")
    base = models(t.sft)
    base[NORM] = torch.zeros(64, dtype=torch.bfloat16)
    frm = write_model(t.sft, root / "from", base)

    def make(values: list[float], name: str) -> Path:
        tensors = dict(base)
        norm = torch.zeros(64)
        norm[: len(values)] = torch.tensor(values)
        tensors[NORM] = norm.to(torch.bfloat16)
        to = write_model(t.sft, root / f"to-{name}", tensors)
        extract(str(frm), str(to), root / name, progress=False)
        return root / name

    v = [make([4, -1, 2, 0, 3, -5], "a"), make([-2, -3, 1, 1, 0, 6], "b"), make([1, 2, -6, 0, 0, -1], "c")]
    return v


def norm_of(folder: Path) -> list[float]:
    return VectorFolder(folder).dense(NORM)[:6].tolist()


def test_ties_trims_elects_and_takes_the_disjoint_mean(hand, tmp_path):
    # D·n = 4 of 64: a keeps 4, 2, 3, -5; b keeps -2, -3, 1, 6 (|1| tie at 2 and 3: the lower index);
    # c keeps 1, 2, -6, -1. Sums 3, -1, -3, 0, 3, 0 elect +, -, -, none, +, none
    combine(hand, tmp_path / "t", method="ties", density=4 / 64, progress=False)
    assert norm_of(tmp_path / "t") == [2.5, -3.0, -6.0, 0.0, 3.0, 0.0]
    # weights before the election: with b at 0.5, element 1 sums to -1.5 + 2 > 0 (c's 2 wins where the
    # unweighted vote elected b's -3), and element 5 to -5 + 3 - 1 < 0 (mean of a's and c's: (-5 - 1)/2)
    combine(hand, tmp_path / "w", weights=[1, 0.5, 1], method="ties", density=4 / 64, progress=False)
    assert norm_of(tmp_path / "w") == [2.5, 2.0, -6.0, 0.0, 3.0, -3.0]
    assert VectorCard.read(tmp_path / "w").provenance.density == 4 / 64  # type: ignore[union-attr]


def test_ties_trim_keeps_the_largest_magnitudes_lowest_index_first():
    v = torch.tensor([1.0, -3.0, 1.0, 2.0, -1.0])
    assert ties_trim(v, 0.6).tolist() == [1.0, -3.0, 0.0, 2.0, 0.0]
    assert ties_trim(v, 1.0).tolist() == v.tolist()


def test_ties_with_density_one_on_sign_agreeing_inputs_is_the_mean_over_nonzero_inputs(hand, tmp_path, trio):
    a, b, _ = hand
    # same signs everywhere a and b are both nonzero? no: build two agreeing ones from a
    combine([a, a], tmp_path / "aa", weights=[1, 3], method="ties", density=1.0, progress=False)
    va = torch.tensor([4.0, -1, 2, 0, 3, -5])
    assert norm_of(tmp_path / "aa") == ((va + 3 * va) / 2).tolist()


def test_dare_drops_with_the_documented_mask_and_rescales(hand, tmp_path):
    a, b, _ = hand
    combine([a, b], tmp_path / "d", method="dare", density=0.5, seed=3, progress=False)
    va = torch.zeros(64)
    va[:6] = torch.tensor([4.0, -1, 2, 0, 3, -5])
    vb = torch.zeros(64)
    vb[:6] = torch.tensor([-2.0, -3, 1, 1, 0, 6])
    ka, kb = dare_keep(64, 0.5, 3, 0, NORM), dare_keep(64, 0.5, 3, 1, NORM)
    expected = torch.where(ka, va * 2, 0.0) + torch.where(kb, vb * 2, 0.0)
    assert VectorFolder(tmp_path / "d").dense(NORM).tolist() == expected.tolist()
    assert 0 < int(ka.sum()) < 64  # the mask drops some and keeps some
    combine([a, b], tmp_path / "d2", method="dare", density=0.5, seed=3, progress=False)
    assert norm_of(tmp_path / "d2") == norm_of(tmp_path / "d")


# ---------------------------------------------------------------- scale patterns


def test_scale_patterns_first_match_wins_searched_anywhere_rest_at_scale():
    p = ScalePatterns.parse([r"layers\.0\.=0.5", "mlp=1.2", r"layers\.0\.mlp=9"], default=0.8)
    assert p.scale_for("model.layers.0.mlp.up_proj.weight") == 0.5  # both of the first two match: the first
    assert p.scale_for("model.layers.1.mlp.up_proj.weight") == 1.2  # found in the middle of the name
    assert p.scale_for("model.layers.1.self_attn.q_proj.weight") == 0.8
    assert ScalePatterns.parse(["(?=q)q_proj=2"]).scale_for("x.q_proj") == 2.0  # REGEX may hold '='


@pytest.mark.parametrize("spec, words", [
    ("layers.(0=0.5", ["--scale-pattern", "not a valid regular expression"]),
    ("mlp=abc", ["--scale-pattern", "'abc'", "not a number"]),
    ("mlp=inf", ["--scale-pattern", "finite"]),
    ("mlp", ["--scale-pattern", "REGEX=α"]),
    ("=2", ["--scale-pattern", "empty"]),
])
def test_bad_scale_patterns_are_refused_with_one_clear_line(spec, words):
    with pytest.raises(InvalidOptionError) as e:
        ScalePatterns.parse([spec])
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_apply_with_scale_patterns_gives_each_tensor_its_alpha(pair, tmp_path):
    t, v1, *_ = pair
    d1 = delta(t.rl, t.sft)
    res = apply(v1, str(t.target), tmp_path / "out", scale=0.7, scale_patterns=[r"layers\.0\.=0.5", "mlp=-1"],
                progress=False)

    def alpha(name: str) -> float:
        return 0.5 if "layers.0." in name else -1.0 if "mlp" in name else 0.7

    assert res.scales == {k: alpha(k) for k in res.scales}, res.scales
    assert set(res.scales) == set(VectorFolder(v1).entries)
    tgt = models(t.target)
    expected = {k: (v.float() + alpha(k) * d1[k]).to(v.dtype) if k in d1 else v for k, v in tgt.items()}
    assert_bitwise_equal(plus_zero(models(tmp_path / "out")), plus_zero(expected))


def test_combine_records_and_applies_scale_patterns(pair, tmp_path):
    t, v1, *_ = pair
    d1 = delta(t.rl, t.sft)
    res = combine([v1], tmp_path / "c", scale=2.0, scale_patterns=["mlp=0.25"], progress=False)
    assert res.scales == {k: 0.25 if "mlp" in k else 2.0 for k in VectorFolder(v1).entries}
    expected = {k: d1[k] * torch.tensor(0.25 if "mlp" in k else 2.0) for k in d1}
    assert_combination(tmp_path / "c", expected)
    prov = VectorCard.read(tmp_path / "c").provenance
    assert prov is not None and prov.scale == 2.0
    assert [(p.pattern, p.alpha) for p in prov.scale_patterns] == [("mlp", 0.25)]


# ---------------------------------------------------------------- cards and inputs


def test_a_version_1_card_still_loads(pair, tmp_path):
    _, v1, *_ = pair
    old = copy_folder(v1, tmp_path / "old")
    raw = json.loads((old / "rvhub.json").read_text())
    raw["schema_version"] = 1
    (old / "rvhub.json").write_text(json.dumps(raw))
    assert VectorCard.read(old).schema_version == 1
    combine([old], tmp_path / "c", progress=False)  # and combines


def test_inputs_from_a_registry_are_pulled_verified_and_pinned(pair, tmp_path):
    from rvhub.registry import push

    _, v1, _, v3, _ = pair
    reg = tmp_path / "registry"
    pushed = push(v1, "org/one", registry=reg, progress=False)
    combine(["org/one", v3], tmp_path / "c", registry=reg, progress=False)
    combine([v1, v3], tmp_path / "local", progress=False)
    assert_bitwise_equal(decoded(tmp_path / "c"), decoded(tmp_path / "local"))
    prov = VectorCard.read(tmp_path / "c").provenance
    assert prov is not None and prov.inputs[0].ref == f"org/one@{pushed.commit}"


@pytest.mark.parametrize("kwargs, words", [
    (dict(weights=[1.0]), ["--weights", "2 vectors, 1 weights"]),
    (dict(weights="1,x"), ["--weights", "'x' is not a number"]),
    (dict(method="ties", density=0.0), ["--density", "(0, 1]"]),
    (dict(method="dare", density=1.5), ["--density", "(0, 1]"]),
    (dict(method="dare"), ["--density", "needs"]),
    (dict(density=0.5), ["--density", "only ties and dare"]),
    (dict(method="mean"), ["--method", "sum, ties or dare"]),
    (dict(seed=1), ["--seed", "only dare"]),
])
def test_bad_options_are_refused_before_anything_is_read(pair, tmp_path, kwargs, words):
    _, v1, _, v3, _ = pair
    with pytest.raises(InvalidOptionError) as e:
        combine([v1, v3], tmp_path / "c", progress=False, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "c").exists()


def test_ties_needs_two_inputs(pair, tmp_path):
    _, v1, *_ = pair
    with pytest.raises(InvalidOptionError, match="at least two"):
        combine([v1], tmp_path / "c", method="ties", density=0.5, progress=False)


def test_mismatched_shapes_are_refused_naming_the_tensor(pair, vector, tmp_path):
    _, v1, *_ = pair
    with pytest.raises(ShapeMismatchError) as e:
        combine([v1, vector("qwen2_wide")], tmp_path / "c", progress=False)
    assert "model.embed_tokens.weight" in str(e.value) or "shape mismatch for" in str(e.value)
    assert not (tmp_path / "c").exists()


def test_different_from_models_are_refused_unless_forced(pair, vector, tmp_path):
    _, v1, *_ = pair
    other = vector("qwen2_hard")  # same shapes, another initialisation
    with pytest.raises(IncompatibleInputsError) as e:
        combine([v1, other], tmp_path / "c", progress=False)
    assert "correlate" in str(e.value) and "--force" in str(e.value)
    combine([v1, other], tmp_path / "c", force=True, progress=False)
    assert VectorCard.read(tmp_path / "c").provenance.forced  # type: ignore[union-attr]


def test_a_tampered_input_is_refused(pair, tmp_path):
    _, v1, _, v3, _ = pair
    bad = copy_folder(v3, tmp_path / "bad")
    f = bad / "vector.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        combine([v1, bad], tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_a_missing_input_and_an_output_inside_an_input_are_refused(pair, tmp_path):
    _, v1, *_ = pair
    with pytest.raises(VectorFormatError, match="no such folder"):
        combine([tmp_path / "nope"], tmp_path / "c", progress=False)
    with pytest.raises(InvalidOptionError, match="an input of this command"):
        combine([v1], v1, overwrite=True, progress=False)


def test_cli_combine_and_apply_with_scale_patterns(pair, tmp_path):
    t, v1, _, v3, _ = pair
    done = run_cli("combine", v1, v3, "-o", tmp_path / "c", "--weights", "1,-1", "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["weights"] == [1.0, -1.0] and r["method"] == "sum"
    done = run_cli("apply", tmp_path / "c", "--base", t.target, "-o", tmp_path / "out", "--scale-pattern",
                   r"layers\.1\.=0", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    scales = json.loads(done.stdout)["scales"]
    assert scales and all((a == 0.0) == ("layers.1." in n) for n, a in scales.items())
    bad = run_cli("combine", v1, v3, "-o", tmp_path / "x", "--method", "ties", "--density", "2")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "--density" in bad.stderr
    assert math.isfinite(r["seconds"])


def test_sum_is_exact_on_a_vector_with_fixups(trio, vector, tmp_path):
    t = trio("qwen2_hard")  # sign flips and large values moved next to zero: the inputs carry fix-ups
    v = vector("qwen2_hard")
    assert sum(e.fixups for e in VectorCard.read(v).tensors) > 0
    d = delta(t.rl, t.sft)
    combine([v, v], tmp_path / "c", weights=[1.0, -0.375], progress=False)
    w = torch.tensor(-0.375)
    assert_combination(tmp_path / "c", {k: d[k] + d[k] * w for k in d})


def test_an_adapter_folder_is_refused_with_a_hint(lowrank, tmp_path):
    from rvhub.compress import compress

    _, vec = lowrank("llama")
    compress(vec, tmp_path / "a", rank=3, progress=False)
    with pytest.raises(VectorFormatError, match="combine the sparse or dense vectors it was compressed from"):
        combine([vec, tmp_path / "a"], tmp_path / "c", progress=False)


def test_pull_apply_takes_scale_patterns(pair, tmp_path):
    from rvhub.registry import pull_apply, push

    t, v1, *_ = pair
    reg = tmp_path / "registry"
    push(v1, "org/one", registry=reg, progress=False)
    with pytest.raises(InvalidOptionError, match="--scale-pattern"):
        pull_apply("org/one", str(t.target), tmp_path / "bad", registry=reg, scale_patterns=["(=1"], progress=False)
    got = pull_apply("org/one", str(t.target), tmp_path / "out", registry=reg, scale=0.5,
                     scale_patterns=["mlp=2"], progress=False)
    local = apply(v1, str(t.target), tmp_path / "local", scale=0.5, scale_patterns=["mlp=2"], progress=False)
    assert got.applied is not None and got.applied.scales == local.scales
    assert_bitwise_equal(models(tmp_path / "out"), models(tmp_path / "local"))

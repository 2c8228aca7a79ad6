"""``rvhub compress``: planted low-rank deltas are recovered, the rank rules hold, PEFT and transformers load
the adapter and agree with ``rvhub apply`` of it, and bad input is refused."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import EMBED, HEAD, assert_bitwise_equal, assert_no_output, load_tensors, run_cli
from safetensors.torch import load_file

from rvhub.apply import apply
from rvhub.card import VectorCard
from rvhub.compress import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, compress
from rvhub.errors import IncompatibleError, IntegrityError, InvalidOptionError, ShapeMismatchError, VectorFormatError
from rvhub.extract import extract
from rvhub.toy import Trio, rewrite_weights

RANK = 3  # the rank of the deltas planted in the `lowrank` trios (conftest)


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = B·A (ΔE = (B·A)ᵀ for embeddings) per vector tensor, straight from the adapter file and config."""
    state = load_file(str(adapter / ADAPTER_WEIGHTS))
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = state[key.replace("lora_A", "lora_B")]
            out[module + ".weight"] = b.float() @ a.float()
        elif key.endswith(".lora_embedding_A"):
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_embedding_A")
            out[module + ".weight"] = (state[key.replace("_A", "_B")].float() @ a.float()).T
        else:
            continue
        r = a.shape[0]
        assert config["alpha_pattern"] == config["rank_pattern"] and config["lora_alpha"] == config["r"], (
            "every module's scale lora_alpha/r must be exactly 1"
        )
        assert r >= 1
    return out


def true_delta(trio: Trio) -> dict[str, torch.Tensor]:
    sft, rl = load_tensors(trio.sft), load_tensors(trio.rl)
    return {k: rl[k].float() - sft[k].float() for k in sft}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("name", ["qwen2", "llama"])
@pytest.mark.parametrize("format", ["sparse", "dense"])
def test_planted_rank_is_recovered(lowrank: Callable[..., tuple[Trio, Path]], tmp_path: Path, name: str,
                                   format: str) -> None:
    trio, vec = lowrank(name, format)
    result = compress(vec, tmp_path / "ad", rank=RANK, progress=False)
    report = result.report
    truth = true_delta(trio)
    got = lora_deltas(tmp_path / "ad")
    linear = {k for k, v in truth.items() if v.dim() == 2 and "embed" not in k and not k.startswith("lm_head")}
    assert set(got) == linear, "every linear weight, and nothing else, is a LoRA module"
    for k in linear:
        assert rel(got[k], truth[k]) <= 1e-5, k
    assert {m.rank for m in report.modules} == {RANK}
    assert max(m.rel_error for m in report.modules) <= 1e-5
    assert report.rel_error <= 1e-5 and report.dropped_energy <= 1e-10
    assert report.adapter_energy == pytest.approx(1.0, abs=1e-5)  # nothing planted outside the linear weights
    # a planted rank-3 delta has 3 nonzero singular values: randomized and exact agree (both ~0)
    for c in report.svd_checks:
        assert c.randomized_error <= 1e-5 * math.sqrt(report.total_sq_norm)


def test_residual_is_exact_and_apply_recovers_rl(lowrank: Callable[..., tuple[Trio, Path]], tmp_path: Path) -> None:
    """Default: embeddings stay in the residual in the vector's exact encoding; the adapter applied to SFT
    gives RL's embeddings bit for bit and its linear weights within the SVD's rounding."""
    trio, vec = lowrank("llama_emb")
    report = compress(vec, tmp_path / "ad", rank=RANK, progress=False).report
    assert set(report.residual) == {EMBED, HEAD}
    assert 0 < report.residual_energy < 1
    adapter = load_file(str(tmp_path / "ad" / ADAPTER_WEIGHTS))
    assert not [k for k in adapter if "embed" in k or "lm_head" in k], "the default adapter has no embeddings"
    apply(tmp_path / "ad", str(trio.sft), tmp_path / "out", progress=False)
    got, rl = load_tensors(tmp_path / "out"), load_tensors(trio.rl)
    assert_bitwise_equal({k: got[k] for k in (EMBED, HEAD)}, {k: rl[k] for k in (EMBED, HEAD)})
    for k in rl:
        assert rel(got[k], rl[k]) <= 1e-6, k


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("name,embeddings", [("qwen2", "residual"), ("llama", "residual"), ("llama_emb", "lora")])
def test_peft_and_transformers_match_rvhub_apply(
    lowrank: Callable[..., tuple[Trio, Path]], tmp_path: Path, name: str, embeddings: str
) -> None:
    """At a rank below the planted one (so the adapter is lossy), PeftModel.from_pretrained, load_adapter and
    merge_and_unload give the logits of ``rvhub apply`` of the same adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trio, vec = lowrank(name)
    ad = tmp_path / "ad"
    report = compress(vec, ad, rank=RANK - 1, embeddings=embeddings, progress=False).report  # type: ignore[arg-type]
    assert report.rel_error > 0.1, "the adapter must be lossy for this test to mean something"
    apply(ad, str(trio.target), tmp_path / "out", progress=False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    def base() -> Any:
        return AutoModelForCausalLM.from_pretrained(trio.target, dtype=torch.float32)

    ours = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32), ids)
    plain = _logits(base(), ids)
    assert rel(plain, ours) > 1e-3, "the adapter must move the logits"
    peft_model = PeftModel.from_pretrained(base(), str(ad))
    assert rel(_logits(peft_model, ids), ours) <= 1e-4
    merged = peft_model.merge_and_unload()
    assert rel(_logits(merged, ids), ours) <= 1e-4
    hf = base()
    hf.load_adapter(str(ad))
    assert rel(_logits(hf, ids), ours) <= 1e-4


def test_tied_embeddings_lora_is_refused(vector: Callable[..., Path], tmp_path: Path) -> None:
    """PEFT applies a tied embedding LoRA to the input side only (unmerged) or twice (merged with
    ensure_weight_tying): rvhub refuses to write one and says why."""
    with pytest.raises(InvalidOptionError, match="tie") as err:
        compress(vector("qwen2_plain"), tmp_path / "ad", rank=2, embeddings="lora", progress=False)
    assert "residual" in str(err.value)
    assert_no_output(tmp_path / "ad")


def test_energy_rule_keeps_the_smallest_sufficient_rank(vector: Callable[..., Path], tmp_path: Path) -> None:
    vec = vector("llama_plain")
    report = compress(vec, tmp_path / "ad", energy=0.6, progress=False).report
    truth = {}
    from rvhub.formats import VectorFolder

    folder = VectorFolder(vec)
    for m in report.modules:
        truth[m.name] = folder.dense(m.name)
        s2 = torch.linalg.svdvals(truth[m.name]).double() ** 2
        frac = torch.cumsum(s2, 0) / s2.sum()
        assert m.energy >= 0.6 - 1e-6
        assert 1 - m.rel_error**2 >= 0.6 - 1e-4, "the measured error agrees with the energy kept"
        assert m.rank == 1 or frac[m.rank - 2] < 0.6 + 1e-4, f"{m.name}: rank {m.rank} is not the smallest"
    got = lora_deltas(tmp_path / "ad")
    for m in report.modules:
        assert rel(got[m.name], truth[m.name]) == pytest.approx(m.rel_error, rel=1e-3)


def test_budget_beats_uniform_at_equal_parameters(lowrank: Callable[..., tuple[Trio, Path]],
                                                  tmp_path: Path) -> None:
    """Layer 0's planted delta is 10x layer 1's: at the parameter count of uniform rank 2, the budget buys
    layer 0 its full rank 3 from layer 1's ranks and beats uniform rank 2."""
    trio, _ = lowrank("llama")
    sft, rl = load_tensors(trio.sft), load_tensors(trio.rl)
    moved = {k: sft[k] + (10 if "layers.0." in k else 1) * (rl[k] - sft[k]) for k in sft}
    rewrite_weights(trio.rl, tmp_path / "rl", moved)
    extract(str(trio.sft), str(tmp_path / "rl"), tmp_path / "vec", progress=False)
    uniform = compress(tmp_path / "vec", tmp_path / "u", rank=2, progress=False).report
    budget = compress(tmp_path / "vec", tmp_path / "b", budget=uniform.adapter_params, progress=False).report
    assert budget.adapter_params <= uniform.adapter_params
    assert budget.rel_error < 0.5 * uniform.rel_error
    ranks = {m.name: m.rank for m in budget.modules}
    assert all(r == 3 for k, r in ranks.items() if "layers.0." in k)
    assert min(ranks.values()) >= 1
    config = json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())
    assert all(r >= 1 for r in config["rank_pattern"].values()) and config["r"] >= 1
    for name, r in ranks.items():
        assert config["rank_pattern"].get(re.escape(name.removesuffix(".weight")), config["r"]) == r
        assert config["alpha_pattern"].get(re.escape(name.removesuffix(".weight")), config["lora_alpha"]) == r
    # on noise-like spectra (the sparse toy vector) the budget does no worse than uniform either
    uniform = compress(vector_path := lowrank("llama")[1], tmp_path / "u2", rank=2, progress=False).report
    budget = compress(vector_path, tmp_path / "b2", budget=uniform.adapter_params, progress=False).report
    assert budget.rel_error <= uniform.rel_error + 1e-6


def test_zero_modules_are_left_out_never_rank_zero(trio: Callable[[str], Trio], tmp_path: Path) -> None:
    t = trio("llama_plain")
    frozen = "model.layers.1.self_attn.k_proj.weight"
    rl = load_tensors(t.rl)
    rl[frozen] = load_tensors(t.sft)[frozen]
    rewrite_weights(t.rl, tmp_path / "rl", rl)
    extract(str(t.sft), str(tmp_path / "rl"), tmp_path / "vec", progress=False)
    compress(tmp_path / "vec", tmp_path / "ad", energy=1e-9, progress=False)
    card = VectorCard.read(tmp_path / "ad")
    assert card.compression is not None
    assert frozen in card.unchanged and frozen not in {m.name for m in card.compression.modules}
    assert min(m.rank for m in card.compression.modules) == 1
    keys = load_file(str(tmp_path / "ad" / ADAPTER_WEIGHTS))
    assert not [k for k in keys if "layers.1.self_attn.k_proj" in k]
    assert all(v.shape[0] >= 1 for k, v in keys.items() if "lora_A" in k)
    # target_modules cannot use the leaf name k_proj, which would also wrap the frozen module
    config = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert "k_proj" not in config["target_modules"]
    assert "model.layers.0.self_attn.k_proj" in config["target_modules"]
    # and PEFT wraps exactly the adapter's modules, with the stored factors
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(t.target), str(tmp_path / "ad"))
    wrapped = {n.removeprefix("base_model.model.") for n, mod in model.named_modules() if hasattr(mod, "lora_A")}
    assert wrapped == {m.name.removesuffix(".weight") for m in card.compression.modules}
    q = "model.layers.0.self_attn.q_proj"
    loaded = model.base_model.model.get_submodule(q).lora_A["default"].weight
    assert torch.equal(loaded.float(), keys[f"base_model.model.{q}.lora_A.weight"].float())


def test_randomized_svd_within_one_percent_of_exact(vector: Callable[..., Path], tmp_path: Path) -> None:
    vec = vector("qwen2_wide")
    fast = compress(vec, tmp_path / "r", rank=8, progress=False).report
    exact = compress(vec, tmp_path / "e", rank=8, exact=True, progress=False).report
    assert fast.svd == "randomized" and exact.svd == "exact"
    assert fast.rel_error <= 1.01 * exact.rel_error
    assert fast.svd_checks and all(c.randomized_error <= 1.01 * c.exact_error for c in fast.svd_checks)
    # the report's errors (‖ΔW‖² − Σσ², for errors this large) are those of the factors written
    from rvhub.formats import VectorFolder

    folder, got = VectorFolder(vec), lora_deltas(tmp_path / "r")
    assert min(m.rel_error for m in fast.modules) > 0.1
    for m in fast.modules:
        assert rel(got[m.name], folder.dense(m.name)) == pytest.approx(m.rel_error, rel=1e-5)


def test_adapter_card_and_manifest(lowrank: Callable[..., tuple[Trio, Path]], tmp_path: Path) -> None:
    _, vec = lowrank("llama")
    compress(vec, tmp_path / "ad", rank=RANK, dtype="bfloat16", progress=False)
    card = VectorCard.read(tmp_path / "ad")
    assert card.format == "lora" and card.compression is not None and not card.exact
    assert card.compression.adapter_dtype == "BF16"
    assert {f.path for f in card.files} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "residual.safetensors"}
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(tmp_path / "ad" / ADAPTER_WEIGHTS)).values())
    # bf16 factors: the report measures the stored factors, not the float32 ones
    assert 1e-4 < card.compression.rel_error < 2e-2


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(rank=0), "--rank"),
        (dict(rank=-2), "--rank"),
        (dict(energy=0.0), "--energy"),
        (dict(energy=1.5), "--energy"),
        (dict(budget=10), "--budget.*at least"),
        (dict(rank=2, energy=0.5), "exactly one"),
        (dict(), "exactly one"),
        (dict(rank=2, dtype="int8"), "--dtype"),
    ],
)
def test_bad_options_are_refused(vector: Callable[..., Path], tmp_path: Path, options: dict[str, Any],
                                 match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        compress(vector("llama_plain"), tmp_path / "ad", progress=False, **options)
    assert_no_output(tmp_path / "ad")


def test_bad_adapter_folders_are_refused(lowrank: Callable[..., tuple[Trio, Path]], trio: Callable[[str], Trio],
                                         tmp_path: Path) -> None:
    _, vec = lowrank("llama")
    ad = tmp_path / "ad"
    compress(vec, ad, rank=2, progress=False)
    with pytest.raises(VectorFormatError, match="adapter"):
        compress(ad, tmp_path / "again", rank=1, progress=False)
    # another architecture: equal tensor names and shapes, but the check tells qwen2 from llama
    with pytest.raises(IncompatibleError, match="model_type"):
        apply(ad, str(trio("qwen2_plain").target), tmp_path / "o1", progress=False)
    assert_no_output(tmp_path / "o1")
    with pytest.raises(ShapeMismatchError):
        apply(ad, str(trio("qwen2_wide").target), tmp_path / "o1", progress=False, force=True)
    assert_no_output(tmp_path / "o1")
    (ad / ADAPTER_CONFIG).unlink()
    with pytest.raises(IntegrityError, match=ADAPTER_CONFIG):
        apply(ad, str(lowrank("llama")[0].target), tmp_path / "o2", progress=False)
    assert_no_output(tmp_path / "o2")


def test_cli_prints_the_quality_table_and_json(lowrank: Callable[..., tuple[Trio, Path]], tmp_path: Path) -> None:
    _, vec = lowrank("qwen2")
    done = run_cli("compress", vec, "-o", tmp_path / "ad", "--rank", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "model.layers.1.mlp.down_proj.weight" in done.stdout and "total relative error" in done.stdout
    done = run_cli("compress", vec, "-o", tmp_path / "ad2", "--budget", "5000", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    assert report["rule"] == "budget" and report["adapter_params"] <= 5000
    done = run_cli("compress", vec, "-o", tmp_path / "ad3", "--rank", "0")
    assert done.returncode == 1 and done.stderr.startswith("error:") and "--rank" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.gpu
def test_cuda_svd_matches_cpu(lowrank: Callable[..., tuple[Trio, Path]], tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _, vec = lowrank("llama")
    cpu = compress(vec, tmp_path / "c", rank=RANK, progress=False).report
    gpu = compress(vec, tmp_path / "g", rank=RANK, device="cuda", progress=False).report
    assert gpu.rel_error <= 1e-5 and cpu.rel_error <= 1e-5
    a, b = lora_deltas(tmp_path / "c"), lora_deltas(tmp_path / "g")
    for k in a:
        assert rel(b[k], a[k]) <= 1e-5




def test_bias_and_norm_deltas_stay_exact_in_the_residual(trio: Callable[[str], Trio], vector: Callable[..., Path],
                                                        tmp_path: Path) -> None:
    """mergekit writes bias deltas as lora_B.bias, which PEFT ignores: rvhub keeps every 1-D delta (biases and
    norms) and the embeddings in the residual, and `rvhub apply` restores them bit for bit."""
    t = trio("qwen2_plain")
    report = compress(vector("qwen2_plain"), tmp_path / "ad", rank=2, progress=False).report
    biases = {k for k in load_tensors(t.sft) if k.endswith(".bias")}
    assert biases and biases <= set(report.residual) and EMBED in report.residual
    keys = load_file(str(tmp_path / "ad" / ADAPTER_WEIGHTS))
    assert not [k for k in keys if "bias" in k or "norm" in k or "embed" in k]
    apply(tmp_path / "ad", str(t.sft), tmp_path / "out", progress=False)
    got, rl = load_tensors(tmp_path / "out"), load_tensors(t.rl)
    exact = sorted(biases | {EMBED})
    assert_bitwise_equal({k: got[k] for k in exact}, {k: rl[k] for k in exact})


def test_nothing_for_lora_to_carry_is_refused(trio: Callable[[str], Trio], tmp_path: Path) -> None:
    """Only a norm moved: no 2-D delta at all. Only a zero changed sign: a 2-D tensor is listed as changed
    (its bits differ) but its delta is zero. Both are one clear error and no output."""
    t = trio("llama_plain")
    sft = load_tensors(t.sft)
    norm, q = "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"
    moved = dict(sft)
    moved[norm] = sft[norm] + 1
    rewrite_weights(t.sft, tmp_path / "rl-norm", moved)
    signed_zero = dict(sft)
    sft_zero = dict(sft)
    sft_zero[q] = sft[q].clone()
    sft_zero[q].view(-1)[0] = 0.0
    signed_zero[q] = sft_zero[q].clone()
    signed_zero[q].view(-1)[0] = -0.0
    rewrite_weights(t.sft, tmp_path / "sft-zero", sft_zero)
    rewrite_weights(t.sft, tmp_path / "rl-zero", signed_zero)
    cases = [(t.sft, tmp_path / "rl-norm", "no 2-D weight deltas"),
             (tmp_path / "sft-zero", tmp_path / "rl-zero", "every 2-D weight delta is zero")]
    for i, (a, b, says) in enumerate(cases):
        extract(str(a), str(b), tmp_path / f"vec{i}", progress=False)
        with pytest.raises(VectorFormatError, match=says):
            compress(tmp_path / f"vec{i}", tmp_path / f"ad{i}", rank=2, progress=False)
        assert_no_output(tmp_path / f"ad{i}")


def test_base_model_follows_the_recommended_bases(lowrank: Callable[..., tuple[Trio, Path]], tmp_path: Path) -> None:
    import shutil

    from rvhub.benchmarks import edit_card
    from rvhub.formats import open_vector

    _, source = lowrank("llama")
    vec = tmp_path / "vec"
    shutil.copytree(source, vec)

    def base(folder: Path) -> Any:
        return json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]

    compress(vec, tmp_path / "plain", rank=RANK, progress=False)
    assert base(tmp_path / "plain") is None  # local sources, no recommendation: nothing to name
    edit_card(vec, recommended_bases=["org/instruct", "org/other"])
    compress(vec, tmp_path / "rec", rank=RANK, progress=False)
    assert base(tmp_path / "rec") == "org/instruct"
    compress(vec, tmp_path / "given", rank=RANK, base_model="org/other", progress=False)
    assert base(tmp_path / "given") == "org/other"
    assert VectorCard.read(tmp_path / "given").recommended_bases == ["org/other", "org/instruct"]
    compress(vec, tmp_path / "local", rank=RANK, base_model="/models/instruct", progress=False)
    assert base(tmp_path / "local") == "/models/instruct"
    assert VectorCard.read(tmp_path / "local").recommended_bases == ["org/instruct", "org/other"]

    # editing an adapter's recommended bases moves base_model_name_or_path, and the manifest stays valid
    before = json.loads((tmp_path / "plain" / ADAPTER_CONFIG).read_text())
    edit_card(tmp_path / "plain", recommended_bases=["org/new"])
    after = json.loads((tmp_path / "plain" / ADAPTER_CONFIG).read_text())
    assert after == {**before, "base_model_name_or_path": "org/new"}
    open_vector(tmp_path / "plain")  # verifies every file's sha256
    edit_card(tmp_path / "plain", license="mit")  # other edits leave the config alone
    assert base(tmp_path / "plain") == "org/new"

    # a tampered config is not laundered into the manifest, and a card that does not list it is refused
    (tmp_path / "plain" / ADAPTER_CONFIG).write_text(json.dumps({**after, "r": 99}))
    with pytest.raises(IntegrityError):
        edit_card(tmp_path / "plain", recommended_bases=["org/newer"])
    card = VectorCard.read(tmp_path / "local")
    card.model_copy(update={"files": [f for f in card.files if f.path != ADAPTER_CONFIG]}).write(tmp_path / "local")
    config_before = (tmp_path / "local" / ADAPTER_CONFIG).read_bytes()
    with pytest.raises(VectorFormatError, match="not in the card's file manifest"):
        edit_card(tmp_path / "local", recommended_bases=["org/newer"])
    assert (tmp_path / "local" / ADAPTER_CONFIG).read_bytes() == config_before
    assert VectorCard.read(tmp_path / "local").recommended_bases == ["org/instruct", "org/other"]


def test_budget_grows_partial_spectra_to_the_full_greedy() -> None:
    """The allocation sees only the singular values computed so far; the modules it would grow past them get
    more, and the final ranks are those of the greedy on the full spectra (σ²/cost, most first)."""
    from rvhub.compress import _allocate_budget, _Module

    g = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (50, 20), (30, 30), (60, 10), (25, 45)]
    spectra = []
    for i, (m, n) in enumerate(shapes):
        decay = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -(0.3 + 0.3 * i)
        spectra.append((decay * (1 + 0.01 * torch.rand(min(m, n), generator=g, dtype=torch.float64))).sort(
            descending=True).values.float())
    costs = [m + n for m, n in shapes]
    budget = 9 * sum(costs)

    ranks, left = [1] * len(shapes), budget - sum(costs)  # the greedy, written out on the full spectra
    while options := [(float(s[r]) ** 2 / c, i)
                      for i, (s, r, c) in enumerate(zip(spectra, ranks, costs, strict=True))
                      if r < s.numel() and c <= left]:
        _, i = max(options)
        ranks[i] += 1
        left -= costs[i]

    modules = [_Module(f"m{i}.weight", shape, False) for i, shape in enumerate(shapes)]
    for m, s in zip(modules, spectra, strict=True):
        m.s = s[:2]  # as after a first, small decomposition
    rounds = 0
    while short := _allocate_budget(modules, budget):
        rounds += 1
        for m in short:
            m.s = spectra[modules.index(m)][: 2 * m.s.numel()]
    assert rounds >= 2, "the test must exercise the refinement"
    assert [m.rank for m in modules] == ranks
    assert max(ranks) > 9 and min(ranks) < 9 and sum(r * c for r, c in zip(ranks, costs, strict=True)) <= budget

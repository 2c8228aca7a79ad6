"""extract and apply on tiny models: exactness, α, chunking/sharding, tying, sizes, manifest, loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import (
    EMBED,
    HEAD,
    assert_bitwise_equal,
    assert_no_output,
    bits,
    cache_hub_repo,
    copy_folder,
    expected_apply,
    load_tensors,
    save_tensors,
    unpack_mask,
    write_model,
)

from rvhub.apply import apply
from rvhub.card import ModelRef, VectorCard
from rvhub.errors import ModelNotFoundError, TiedEmbeddingError
from rvhub.extract import extract
from rvhub.formats import VectorFolder
from rvhub.toy import plant_sparse_delta

FORMATS = ["sparse", "dense"]
HARD = ["qwen2_hard", "llama_hard"]  # tied / untied, with elements that need fix-ups
PLAIN = ["qwen2_plain", "llama_plain"]
SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def _apply(vec: Path, base: Path | str, out: Path, **kw: object) -> dict[str, torch.Tensor]:
    apply(vec, str(base), out, progress=False, **kw)  # type: ignore[arg-type]
    return load_tensors(out)


# ---------------------------------------------------------------- exactness


def exact_difference(sft: torch.Tensor, rl: torch.Tensor) -> torch.Tensor:
    """Where fl32(rl) − fl32(sft) is the exact difference (checked in float64, exact for these toys)."""
    return (rl.float() - sft.float()).double() == rl.double() - sft.double()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", HARD)
def test_sft_plus_vector_is_rl_where_the_float32_difference_is_exact(trio, vector, tmp_path, name, fmt):
    """SFT + v is the float32 reference; it is RL bit for bit wherever fl32(rl) − fl32(sft) is exact, which
    the adversarial elements (0.75 moved to ~1e-9, 2^30 apart) are not."""
    t = trio(name)
    vec = vector(name, fmt)
    card = VectorCard.read(vec)
    assert card.exact
    assert card.values_dtype == ("source" if fmt == "sparse" else "F32")
    if fmt == "sparse":
        assert sum(e.fixups for e in card.tensors) > 0, "the sign flips need fix-ups"

    out = _apply(vec, t.sft, tmp_path / "out")

    sft, rl = load_tensors(t.sft), load_tensors(t.rl)
    assert_bitwise_equal(out, expected_apply(sft, sft, rl, 1.0), f"{name} SFT + v ({fmt})")
    inexact = 0
    for n in rl:
        exact = exact_difference(sft[n], rl[n])
        assert torch.equal(bits(out[n])[exact], bits(rl[n])[exact]), n
        inexact += int((~exact).sum())
    assert inexact > 0, "the fixture should hold elements whose float32 difference is inexact"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", HARD)
def test_fixups_are_the_deltas_the_dtype_cannot_hold(trio, vector, name, fmt):
    """The fix-ups are exactly the changed elements whose float32 difference is not a value of the stored
    dtype; elsewhere the stored value is that difference."""
    t = trio(name)
    vec = vector(name, fmt)
    card = VectorCard.read(vec)
    stored, sft, rl = load_tensors(vec), load_tensors(t.sft), load_tensors(t.rl)
    for entry in card.tensors:
        n = entry.name
        d = (rl[n].float() - sft[n].float()).reshape(-1)
        if fmt == "sparse":
            idx = unpack_mask(stored[n + "::mask"], d.numel()).nonzero().reshape(-1)
            vals = stored[n + "::values"]
        else:
            idx = torch.arange(d.numel())
            vals = stored[n].reshape(-1)
        want = idx[vals.float() != d[idx]]
        fix_index = stored.get(n + "::fix_index", torch.empty(0, dtype=torch.int64))
        assert fix_index.numel() == entry.fixups, n
        if fmt == "sparse":
            assert torch.equal(want, fix_index), f"{n}: fix-ups {fix_index} vs elements bf16 cannot hold {want}"
            if entry.fixups:
                assert torch.equal(stored[n + "::fix_hi"], d[fix_index]), n
        else:
            assert want.numel() == 0 and entry.fixups == 0, "float32 dense stores every difference as it is"
        assert n + "::fix_lo" not in stored


def test_changed_counts_and_unchanged_tensors(trio, vector):
    t = trio("qwen2_hard")
    vec = vector("qwen2_hard")
    card = VectorCard.read(vec)
    sft, rl = load_tensors(t.sft), load_tensors(t.rl)

    unchanged = sorted(n for n in sft if torch.equal(bits(sft[n]), bits(rl[n])))
    assert unchanged and all("norm" in n for n in unchanged)
    assert sorted(card.unchanged) == unchanged
    stored_names = {key.split("::")[0] for key in load_tensors(vec)}
    assert stored_names.isdisjoint(unchanged), "unchanged tensors must not be stored in a sparse vector"
    assert stored_names == {e.name for e in card.tensors}
    for e in card.tensors:
        assert e.shape == tuple(sft[e.name].shape) and e.source_dtype == "BF16"
        assert e.changed == int((sft[e.name] != rl[e.name]).sum()), e.name
    fraction = sum(e.changed for e in card.tensors) / sum(v.numel() for v in sft.values())
    assert 0.15 < fraction < 0.22, f"{fraction:.3f} of the elements changed; the toy RL moves 20% of non-norm ones"


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunks_and_shards_change_nothing(trio, vector, tmp_path, fmt):
    t = trio("qwen2_hard")
    default = vector("qwen2_hard", fmt)
    small = vector("qwen2_hard", fmt, chunk_elems=1000, max_shard_size="20KB")

    shards = sorted(p.name for p in small.glob("vector-*.safetensors"))
    assert len(shards) > 1 and (small / "vector.safetensors.index.json").is_file(), shards
    assert VectorCard.read(small).tensors == VectorCard.read(default).tensors
    assert_bitwise_equal(load_tensors(small), load_tensors(default), "chunked + sharded vs default vector")

    reference = _apply(default, t.target, tmp_path / "ref", scale=0.5)
    chunked = _apply(small, t.target, tmp_path / "chunked", scale=0.5, chunk_elems=1000, max_shard_size="50KB")
    assert len(list((tmp_path / "chunked").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "chunked" / "model.safetensors.index.json").is_file()
    assert_bitwise_equal(chunked, reference, "chunked apply vs default apply")
    mixed = _apply(default, t.target, tmp_path / "mixed", scale=0.5, chunk_elems=777)
    assert_bitwise_equal(mixed, reference, "apply in chunks of a vector extracted whole")

    exact = _apply(small, t.sft, tmp_path / "exact", chunk_elems=1000)
    sft, rl = load_tensors(t.sft), load_tensors(t.rl)
    assert_bitwise_equal(exact, expected_apply(sft, sft, rl, 1.0), "chunked SFT + v")


def _odd_shape_param(shape: tuple[int, ...], fmt: str) -> object:
    return pytest.param(shape, fmt, id=f"{fmt}-{'x'.join(map(str, shape)) or 'scalar'}")


@pytest.mark.parametrize(
    "shape,fmt",
    [_odd_shape_param(s, f) for s in [(330, 3), (333,), (7, 13), (1,), (), (0, 4)] for f in FORMATS],
)
def test_odd_shapes_in_small_chunks(tmp_path, shape, fmt):
    """Rows that are not a multiple of 8 elements, tensors just under one chunk, scalars, empty tensors.

    (330, 3) has 990 ≤ 1000 elements but spans two 8-aligned row blocks of 1000: before the fix in
    sources.iter_chunks, apply zipped one model chunk with two vector chunks and crashed.
    """
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    moved = torch.rand(shape, generator=g) < 0.3
    moved.view(-1)[:1] = True  # at least one element changes, even in a scalar
    b = (bits(a) + moved.to(torch.int16)).view(torch.bfloat16)
    save_tensors(tmp_path / "a" / "model.safetensors", {"w": a, "other": torch.ones(8, dtype=torch.bfloat16)})
    save_tensors(tmp_path / "b" / "model.safetensors", {"w": b, "other": torch.ones(8, dtype=torch.bfloat16)})

    extract(str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "v", format=fmt, progress=False, chunk_elems=1000)
    out = _apply(tmp_path / "v", tmp_path / "a", tmp_path / "out", chunk_elems=1000)

    assert_bitwise_equal(out, load_tensors(tmp_path / "b"))


def test_vector_between_identical_models_is_empty(trio, tmp_path):
    t = trio("qwen2_plain")
    copy = copy_folder(t.sft, tmp_path / "elsewhere" / "sft-copy")
    result = extract(str(t.sft), str(copy), tmp_path / "v", progress=False)
    card = VectorCard.read(tmp_path / "v")

    assert result.changed_elements == 0 and card.tensors == []
    assert sorted(card.unchanged) == sorted(load_tensors(t.sft))
    # content hashes cover the bytes of the weights, not where the folder is
    assert card.source_from.content_sha256 == card.source_to.content_sha256
    assert card.source_from.id == str(t.sft) and card.source_to.id == str(copy)
    out = _apply(tmp_path / "v", t.target, tmp_path / "out")
    assert_bitwise_equal(out, load_tensors(t.target), "TARGET + empty vector")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_card_says_whether_a_dense_vector_is_exact(trio, vector, tmp_path, dtype):
    t = trio("llama_hard")
    vec = vector("llama_hard", "dense", dtype=dtype)
    sft, rl = load_tensors(t.sft), load_tensors(t.rl)
    folder = VectorFolder(vec)
    decodes_exactly = all(
        torch.equal(folder.dense(n), rl[n].float() - sft[n].float()) for n in folder.entries
    )
    assert VectorCard.read(vec).exact == decodes_exactly == (dtype == "bfloat16")


# ---------------------------------------------------------------- α


@pytest.mark.parametrize("alpha", [0.5, -1.0])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", PLAIN)
def test_apply_matches_float32_reference(trio, vector, tmp_path, name, fmt, alpha):
    t = trio(name)
    out = _apply(vector(name, fmt), t.target, tmp_path / "out", scale=alpha)
    expected = expected_apply(load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl), alpha)
    assert_bitwise_equal(out, expected, f"{name} TARGET + {alpha}·v ({fmt})")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", HARD)
def test_scale_zero_gives_the_target_back(trio, vector, tmp_path, name, fmt):
    t = trio(name)
    out = _apply(vector(name, fmt), t.target, tmp_path / "out", scale=0.0)
    assert_bitwise_equal(out, load_tensors(t.target), f"{name} TARGET + 0·v")


# ---------------------------------------------------------------- the output model


@pytest.mark.parametrize("name", PLAIN)
def test_output_loads_with_transformers_and_keeps_target_files(trio, vector, tmp_path, name):
    from transformers import AutoModelForCausalLM

    t = trio(name)
    out = tmp_path / "out"
    apply(vector(name), str(t.target), out, progress=False)
    expected = expected_apply(load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl), 1.0)
    ref = write_model(t.target, tmp_path / "reference", expected)

    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in t.target.iterdir())
    for f in SIDE_FILES:
        assert (out / f).read_bytes() == (t.target / f).read_bytes(), f"{f} must come from TARGET"
    for f in ("config.json", "generation_config.json", "tokenizer.json"):  # these differ between the trio
        assert (out / f).read_bytes() != (t.sft / f).read_bytes(), f"{f} is SFT's"
        assert (out / f).read_bytes() != (t.rl / f).read_bytes(), f"{f} is RL's"
    assert json.loads((out / "config.json").read_text())["rvhub_test_role"] == "target"
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6

    model = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(ref)
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        logits, want = model(ids).logits, reference(ids).logits
    assert model.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, want)

    tied = name.startswith("qwen2")
    assert model.config.tie_word_embeddings == tied
    assert (HEAD in load_tensors(out)) != tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied


def test_dtype_float32_output(trio, vector, tmp_path):
    from transformers import AutoModelForCausalLM

    t = trio("qwen2_plain")
    out = tmp_path / "out"
    apply(vector("qwen2_plain"), str(t.target), out, dtype="float32", progress=False)
    expected = expected_apply(
        load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl), 1.0, out_dtype=torch.float32
    )
    assert_bitwise_equal(load_tensors(out), expected, "float32 output (not rounded to bf16)")

    config = json.loads((out / "config.json").read_text())
    target_config = json.loads((t.target / "config.json").read_text())
    assert config == {**target_config, "dtype": "float32"} and target_config["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


# ---------------------------------------------------------------- tied embeddings


def test_tied_vector_moves_both_embeddings_of_an_untied_target(trio, vector, tmp_path):
    t = trio("qwen2_plain")
    vec = vector("qwen2_plain")
    card = VectorCard.read(vec)
    assert card.tie_word_embeddings and HEAD not in {e.name for e in card.tensors}
    target = load_tensors(t.target)
    g = torch.Generator().manual_seed(3)
    head = (target[EMBED].float() + 0.01 * torch.randn(target[EMBED].shape, generator=g)).to(torch.bfloat16)
    untied = write_model(t.target, tmp_path / "untied", {**target, HEAD: head}, tie_word_embeddings=False)

    out = _apply(vec, untied, tmp_path / "out")

    expected = expected_apply(
        load_tensors(untied), load_tensors(t.sft), load_tensors(t.rl), 1.0, delta_of={HEAD: EMBED}
    )
    assert_bitwise_equal(out, expected, "tied vector on an untied target")
    assert not torch.equal(out[HEAD], head)


def test_vector_from_tied_to_untied_model(trio, tmp_path):
    """Only `from` ties: the vector gets an lm_head delta against the tied embedding matrix."""
    t = trio("qwen2_plain")
    sft = load_tensors(t.sft)
    assert HEAD not in sft
    sft_untied = write_model(t.sft, tmp_path / "sft_untied", {**sft, HEAD: sft[EMBED].clone()},
                             tie_word_embeddings=False)
    rl_untied = plant_sparse_delta(sft_untied, tmp_path / "rl_untied", seed=5)
    rl = load_tensors(rl_untied)
    assert not torch.equal(rl[HEAD] - sft[EMBED], rl[EMBED] - sft[EMBED])

    extract(str(t.sft), str(rl_untied), tmp_path / "v", progress=False)
    card = VectorCard.read(tmp_path / "v")
    assert not card.tie_word_embeddings and HEAD in {e.name for e in card.tensors}

    assert_bitwise_equal(_apply(tmp_path / "v", sft_untied, tmp_path / "out"), rl, "untied SFT copy + v")

    with pytest.raises(TiedEmbeddingError, match=r"lm_head\.weight") as err:
        apply(tmp_path / "v", str(t.target), tmp_path / "tied_out", progress=False)
    assert err.value.tensor == HEAD
    assert_no_output(tmp_path / "tied_out")


def test_tied_target_output_never_has_lm_head(trio, vector, tmp_path):
    """Even when the tied target's own checkpoint stores an lm_head alias."""
    t = trio("qwen2_plain")
    target = load_tensors(t.target)
    with_head = write_model(t.target, tmp_path / "with_head", {**target, HEAD: target[EMBED].clone()})

    out = _apply(vector("qwen2_plain"), with_head, tmp_path / "out")

    assert HEAD not in out
    assert_bitwise_equal(out, expected_apply(target, load_tensors(t.sft), load_tensors(t.rl), 1.0))


# ---------------------------------------------------------------- sizes and manifest


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_sparse_vector_is_small(trio, vector):
    ratio = _weights_bytes(vector("qwen2_wide")) / _weights_bytes(trio("qwen2_wide").rl)
    assert ratio < 0.35, f"sparse vector is {ratio:.3f}× the bf16 model (20% of elements changed)"


def test_dense_float32_vector_is_twice_the_model(trio, vector):
    ratio = _weights_bytes(vector("qwen2_wide", "dense")) / _weights_bytes(trio("qwen2_wide").rl)
    assert 1.95 < ratio < 2.1, f"dense float32 vector is {ratio:.3f}× the bf16 model"


@pytest.mark.parametrize("fmt,options", [
    ("sparse", {}), ("dense", {}), ("sparse", {"chunk_elems": 1000, "max_shard_size": "20KB"}),
], ids=["sparse", "dense", "sparse-sharded"])
def test_manifest_matches_the_files(vector, fmt, options):
    vec = vector("qwen2_hard", fmt, **options)
    card = VectorCard.read(vec)
    # the card itself (rvhub.json and its rendering README.md) is not in the manifest: it can be re-rendered
    listed = sorted(p.name for p in vec.iterdir() if p.name not in ("rvhub.json", "README.md"))
    assert sorted(f.path for f in card.files) == listed
    for f in card.files:
        data = (vec / f.path).read_bytes()
        assert (f.size, f.sha256) == (len(data), hashlib.sha256(data).hexdigest()), f.path


def test_content_hash_pins_the_weights(trio, vector, tmp_path):
    t = trio("qwen2_plain")
    copy = copy_folder(t.sft, tmp_path / "copy-of-sft")
    extract(str(copy), str(t.rl), tmp_path / "v", progress=False)
    card, original = VectorCard.read(tmp_path / "v"), VectorCard.read(vector("qwen2_plain"))

    assert card.source_from.kind == "local" and card.source_from.id == str(copy)
    assert card.source_from.content_sha256 == original.source_from.content_sha256
    assert card.source_to.content_sha256 == original.source_to.content_sha256
    assert card.source_from.content_sha256 != card.source_to.content_sha256
    assert len(card.source_from.content_sha256 or "") == 64


# ---------------------------------------------------------------- Hub ids (offline, from the cache)


def test_hub_ids_resolve_offline_and_are_pinned(trio, tmp_path):
    t = trio("qwen2_plain")
    sft_commit, target_commit = "1" * 40, "2" * 40
    cache_hub_repo("rvhub-test/sft", t.sft, sft_commit)
    cache_hub_repo("rvhub-test/target", t.target, target_commit)

    extract("rvhub-test/sft", str(t.rl), tmp_path / "v", progress=False)
    card = VectorCard.read(tmp_path / "v")
    assert card.source_from == ModelRef(kind="hub", id="rvhub-test/sft", commit=sft_commit)
    extract(f"rvhub-test/sft@{sft_commit}", str(t.rl), tmp_path / "v2", progress=False)
    assert VectorCard.read(tmp_path / "v2").source_from.revision == sft_commit

    out = _apply(tmp_path / "v", "rvhub-test/target", tmp_path / "out")
    assert_bitwise_equal(out, expected_apply(load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl), 1.0))
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (t.target / "tokenizer.json").read_bytes()

    with pytest.raises(ModelNotFoundError, match="rvhub-test/sft@v9"):
        extract("rvhub-test/sft@v9", str(t.rl), tmp_path / "v3", progress=False)
    assert_no_output(tmp_path / "v3")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_gives_the_cpu_result(trio, vector, tmp_path, fmt):
    t = trio("qwen2_hard")
    vec = vector("qwen2_hard", fmt)
    for scale in (1.0, 0.5):
        cpu = _apply(vec, t.target, tmp_path / f"cpu{scale}", scale=scale)
        cuda = _apply(vec, t.target, tmp_path / f"cuda{scale}", scale=scale, device="cuda")
        assert_bitwise_equal(cuda, cpu, f"cuda vs cpu, α={scale}")
    sft, rl = load_tensors(t.sft), load_tensors(t.rl)
    assert_bitwise_equal(_apply(vec, t.sft, tmp_path / "exact", device="cuda"), expected_apply(sft, sft, rl, 1.0),
                         "SFT + v on cuda")


# (the property test over arbitrary 16-bit pairs is in test_exact.py)


# ---------------------------------------------------------------- float32 models


def test_float32_models_are_exact_and_never_written_through(trio, tmp_path):
    """A float32 vector stores fl32(rl) − fl32(sft) as it is, without fix-ups. A float32 target is read
    through safetensors' file mapping, so apply must never add in place into what it read."""
    t = trio("llama_hard")
    f32 = {}
    for name in ("sft", "rl", "target"):
        tensors = {k: v.float() for k, v in load_tensors(getattr(t, name)).items()}
        f32[name] = write_model(getattr(t, name), tmp_path / name, tensors, dtype="float32")
    target_file = f32["target"] / "model.safetensors"
    before = hashlib.sha256(target_file.read_bytes()).hexdigest()

    result = extract(str(f32["sft"]), str(f32["rl"]), tmp_path / "v", progress=False)
    assert result.exact and result.fixups == 0, "a float32 difference is stored as it is"
    sft, rl = load_tensors(f32["sft"]), load_tensors(f32["rl"])
    out = _apply(tmp_path / "v", f32["sft"], tmp_path / "exact")
    assert_bitwise_equal(out, expected_apply(sft, sft, rl, 1.0), "float32 SFT + v")
    for n in rl:  # RL itself wherever the float32 difference is exact
        exact = exact_difference(sft[n], rl[n])
        assert torch.equal(bits(out[n])[exact], bits(rl[n])[exact]), n

    half = _apply(tmp_path / "v", f32["target"], tmp_path / "half", scale=0.5)
    assert_bitwise_equal(half, expected_apply(load_tensors(f32["target"]), sft, rl, 0.5), "float32 target + 0.5 v")
    assert hashlib.sha256(target_file.read_bytes()).hexdigest() == before

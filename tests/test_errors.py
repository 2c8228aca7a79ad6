"""Bad input through the library: the right RvhubError, a message naming what is wrong, no output left."""

from __future__ import annotations

import pytest
import torch
from bad_inputs import CASE_IDS, CASES, EMBED, UP, call_library
from helpers import (
    HEAD,
    assert_bitwise_equal,
    assert_no_output,
    bits,
    copy_folder,
    expected_apply,
    folder_snapshot,
    load_tensors,
    tmp_siblings,
)

from rvhub.apply import apply
from rvhub.errors import (
    InvalidOptionError,
    NonFiniteError,
    OutputExistsError,
    RvhubError,
    ShapeMismatchError,
    VocabMismatchError,
)
from rvhub.extract import extract
from rvhub.toy import build_model


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_input_is_refused(bad, tmp_path, case):
    out = tmp_path / "out"
    with pytest.raises(RvhubError) as err:
        call_library(case, bad, out)
    assert type(err.value) is case.error, f"{type(err.value).__name__}: {err.value}"
    message = str(err.value)
    assert "\n" not in message
    for fragment in case.says(bad):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert_no_output(out)
    assert not bad.canary.exists(), "a pickle was loaded"


def test_errors_carry_fields(bad, tmp_path):
    with pytest.raises(ShapeMismatchError) as shape:
        extract(str(bad.sft), str(bad.rl_shape), tmp_path / "a", progress=False)
    assert shape.value.tensor == UP and shape.value.shapes == ((128, 64), (130, 64))

    with pytest.raises(VocabMismatchError) as vocab:
        apply(bad.vector, str(bad.target_vocab), tmp_path / "b", progress=False)
    assert vocab.value.tensor == EMBED and vocab.value.rows == (128, 160)

    with pytest.raises(NonFiniteError) as nan:
        extract(str(bad.sft_nan), str(bad.rl), tmp_path / "c", progress=False)
    assert (nan.value.tensor, nan.value.count) == ("model.layers.1.mlp.down_proj.weight", 1)


def test_nan_in_a_target_tensor_the_vector_leaves_alone(bad, tmp_path):
    with pytest.raises(NonFiniteError, match="model.norm.weight"):
        apply(bad.vector, str(bad.target_nan_norm), tmp_path / "out", progress=False)
    assert_no_output(tmp_path / "out")


# ---------------------------------------------------------------- an existing OUT


def _occupied(folder):
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "model.safetensors").write_bytes(b"not a model")
    return folder_snapshot(folder)


@pytest.mark.parametrize("command", ["extract", "apply"])
def test_existing_output_is_refused_and_untouched(bad, tmp_path, command):
    out = tmp_path / "out"
    before = _occupied(out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        if command == "extract":
            extract(str(bad.sft), str(bad.rl), out, progress=False)
        else:
            apply(bad.vector, str(bad.target), out, progress=False)
    assert folder_snapshot(out) == before
    assert not tmp_siblings(out)


def test_overwrite_replaces_the_output(bad, tmp_path):
    out = tmp_path / "out"
    _occupied(out)
    apply(bad.vector, str(bad.target), out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and not (out / "sub").exists()
    expected = expected_apply(load_tensors(bad.target), load_tensors(bad.sft), load_tensors(bad.rl), 1.0)
    assert_bitwise_equal(load_tensors(out), expected)
    assert not tmp_siblings(out)


def test_overwrite_never_replaces_an_input(bad, tmp_path):
    target = copy_folder(bad.target, tmp_path / "target")
    before = folder_snapshot(target)
    with pytest.raises(InvalidOptionError, match="input"):
        apply(bad.vector, str(target), target, overwrite=True, progress=False)
    assert folder_snapshot(target) == before


# ---------------------------------------------------------------- vocabulary mismatch, allowed


@pytest.mark.parametrize("rows", [160, 96])
def test_allowed_vocab_mismatch_moves_common_rows_only(trio, vector, tmp_path, rows):
    t = trio("qwen2_plain")
    target_dir = build_model(tmp_path / "target", "qwen2", seed=7, vocab=rows)
    target, sft, rl = load_tensors(target_dir), load_tensors(t.sft), load_tensors(t.rl)

    # an independently initialised target: force past the lineage check, the arithmetic is what is tested
    result = apply(vector("qwen2_plain"), str(target_dir), tmp_path / "out", allow_vocab_mismatch=True,
                   force=True, chunk_elems=1000, progress=False)

    assert result.skipped_vocab_rows == {EMBED: abs(rows - 128)}
    out = load_tensors(tmp_path / "out")
    common = min(rows, 128)
    emb = target[EMBED].float()
    emb[:common] += rl[EMBED][:common].float() - sft[EMBED][:common].float()
    expected = expected_apply({k: v for k, v in target.items() if k != EMBED}, sft, rl, 1.0)
    assert_bitwise_equal(out, {**expected, EMBED: emb.to(torch.bfloat16)})
    assert torch.equal(bits(out[EMBED][common:]), bits(target[EMBED][common:])), "extra rows must be untouched"


def test_allowed_vocab_mismatch_on_untied_model(vector, tmp_path):
    target_dir = build_model(tmp_path / "target", "llama", seed=8, vocab=144)
    result = apply(vector("llama_plain"), str(target_dir), tmp_path / "out", allow_vocab_mismatch=True,
                   force=True, progress=False)
    assert result.skipped_vocab_rows == {EMBED: 16, HEAD: 16}
    out, target = load_tensors(tmp_path / "out"), load_tensors(target_dir)
    for name in (EMBED, HEAD):
        assert torch.equal(bits(out[name][128:]), bits(target[name][128:]))
        assert not torch.equal(out[name][:128], target[name][:128])

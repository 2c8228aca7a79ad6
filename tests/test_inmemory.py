"""rvhub.add_vector / vector_added: in-memory θ + α·v equals `rvhub apply`'s output bit for bit; restoring is
exact; the control has v's per-tensor norms."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import EMBED, HEAD, assert_bitwise_equal, load_tensors, write_model

from rvhub import add_vector, vector_added
from rvhub.apply import apply
from rvhub.compress import compress
from rvhub.errors import InvalidOptionError, TiedEmbeddingError
from rvhub.formats import open_vector
from rvhub.inmemory import Control
from rvhub.sources import open_model


def _load(folder, dtype=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or "auto")


def _state(model) -> dict[str, torch.Tensor]:
    """The model's tensors as a checkpoint holds them (a tied head is not stored)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop(HEAD, None)
    return state


@pytest.mark.parametrize("name", ["qwen2_hard", "llama_plain"])
@pytest.mark.parametrize("scale", [1.0, -0.5])
def test_add_vector_is_apply_bit_for_bit_and_restores(trio, vector, tmp_path, name, scale):
    t = trio(name)
    vec = vector(name)
    applied = load_tensors(Path(apply(vec, str(t.target), tmp_path / "out", scale=scale, progress=False).out))
    model = _load(t.target)
    original = _state(model)
    assert_bitwise_equal(original, load_tensors(t.target), "loaded target")

    with vector_added(model, vec, scale) as result:
        assert_bitwise_equal(_state(model), applied, f"{name} in memory vs apply, α={scale}")
        assert result.tensors_changed
    assert_bitwise_equal(_state(model), original, "restored from copies")

    with vector_added(model, vec, scale, restore=open_model(str(t.target))):
        assert_bitwise_equal(_state(model), applied, "second time")
    assert_bitwise_equal(_state(model), original, "restored by re-reading the target's files")


def test_tied_model_takes_the_embedding_delta_once(trio, vector):
    t = trio("qwen2_plain")
    model = _load(t.target)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    before = model.model.embed_tokens.weight.detach().clone()
    add_vector(model, vector("qwen2_plain"), 1.0)
    delta = open_vector(vector("qwen2_plain")).dense(EMBED)
    assert torch.equal(model.model.embed_tokens.weight, (before.float() + delta).to(before.dtype))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tied_vector_moves_the_head_of_an_untied_model(trio, vector, tmp_path):
    t = trio("qwen2_plain")
    target = load_tensors(t.target)
    untied = write_model(t.target, tmp_path / "untied", {**target, HEAD: target[EMBED].clone()},
                         tie_word_embeddings=False)
    applied = load_tensors(Path(apply(vector("qwen2_plain"), str(untied), tmp_path / "out", progress=False).out))
    model = _load(untied)
    add_vector(model, vector("qwen2_plain"))
    assert_bitwise_equal(_state(model), applied, "untied model")


def test_adapter_folder_in_memory_equals_apply(lowrank, tmp_path):
    trio, vec = lowrank("llama")
    ad = compress(vec, tmp_path / "ad", rank=3, progress=False).out
    applied = load_tensors(Path(apply(ad, str(trio.target), tmp_path / "out", progress=False).out))
    model = _load(trio.target)
    add_vector(model, ad, 1.0)
    assert_bitwise_equal(_state(model), applied, "adapter in memory vs apply")


def test_float32_model_of_a_bf16_target_equals_apply_with_dtype(trio, vector, tmp_path):
    t = trio("qwen2_hard")
    applied = load_tensors(Path(apply(vector("qwen2_hard"), str(t.target), tmp_path / "o", dtype="float32",
                                      progress=False).out))
    model = _load(t.target, torch.float32)
    add_vector(model, vector("qwen2_hard"), 1.0)
    assert_bitwise_equal(_state(model), applied, "float32")


def test_refusals(trio, vector, tmp_path):
    t = trio("qwen2_plain")
    model = _load(t.target)
    with pytest.raises(InvalidOptionError, match="finite"):
        add_vector(model, vector("qwen2_plain"), math.inf)
    # a vector with an lm_head delta cannot go into a tied model, as in apply
    sft = load_tensors(t.sft)
    sft_untied = write_model(t.sft, tmp_path / "su", {**sft, HEAD: sft[EMBED].clone()}, tie_word_embeddings=False)
    rl = {k: v.clone() for k, v in sft.items()}
    rl[HEAD] = (sft[EMBED].float() + 0.01).to(sft[EMBED].dtype)
    rl_untied = write_model(t.sft, tmp_path / "ru", rl, tie_word_embeddings=False)
    from rvhub.extract import extract

    extract(str(sft_untied), str(rl_untied), tmp_path / "v", progress=False)
    with pytest.raises(TiedEmbeddingError):
        add_vector(model, tmp_path / "v")
    assert_bitwise_equal(_state(model), load_tensors(t.target), "nothing changed")


@pytest.mark.parametrize("kind", ["gaussian", "permute"])
def test_control_has_the_per_tensor_norms_of_v(vector, kind):
    vec = open_vector(vector("llama_plain"))
    control = Control(vec, kind, seed=0)
    for name in vec.entries:
        v = vec.dense(name).reshape(-1)
        r = control.tensor(name)
        assert r.shape == v.shape and not torch.equal(r, v)
        if kind == "permute":
            assert torch.equal(torch.sort(r).values, torch.sort(v).values)
        else:
            assert float(r.double().norm()) == pytest.approx(float(v.double().norm()), rel=1e-6)
    again = Control(vec, kind, seed=0).tensor(next(iter(vec.entries)))
    assert torch.equal(again, Control(vec, kind, seed=0).tensor(next(iter(vec.entries))))
    assert not torch.equal(again, Control(vec, kind, seed=1).tensor(next(iter(vec.entries))))


@pytest.mark.parametrize("keep", [True, False])
def test_the_gaussian_control_streamed_in_blocks_is_the_whole_tensor_draw(vector, monkeypatch, keep):
    """Drawn in blocks (several per tensor here) and rescaled block by block, kept between its two passes or
    drawn twice: the same r as one randn of the whole tensor times ‖v‖/‖noise‖, and the same in any target
    row blocks."""
    from rvhub import inmemory
    from rvhub.inmemory import _seed

    monkeypatch.setattr(inmemory, "CHUNK_ELEMS", 48)  # a multiple of 16, smaller than every matrix here
    monkeypatch.setattr(inmemory, "_KEEP_NOISE_ELEMS", 10**9 if keep else 0)
    vec = open_vector(vector("llama_plain"))
    control = Control(vec, "gaussian", seed=7)
    for name, entry in vec.entries.items():
        v = vec.dense(name).reshape(-1)
        noise = torch.randn(v.numel(), generator=torch.Generator().manual_seed(_seed(7, name)), dtype=v.dtype)
        factor = float(v.double().norm()) / float(noise.double().norm())
        r = control.tensor(name)
        assert float((r - noise * factor).abs().max()) <= 1e-6 * float(r.abs().max()), name
        rows = entry.shape[0] if entry.shape else 1
        chunks = torch.cat([d.values for d in control.delta_chunks(name, rows, 40, 1.0, torch.float32)])
        assert torch.equal(chunks, r), name


def test_control_in_memory_is_target_plus_alpha_r(trio, vector):
    t = trio("llama_plain")
    vec = open_vector(vector("llama_plain"))
    control = Control(vec, "gaussian", seed=3)
    model = _load(t.target)
    before = _state(model)
    add_vector(model, control, 0.5)
    after = _state(model)
    for name in vec.entries:
        r = control.tensor(name).reshape(before[name].shape)
        assert torch.equal(after[name], (before[name].float() + 0.5 * r).to(before[name].dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_equals_apply(trio, vector, tmp_path):
    t = trio("qwen2_hard")
    applied = load_tensors(Path(apply(vector("qwen2_hard"), str(t.target), tmp_path / "o", progress=False).out))
    model = _load(t.target).to("cuda")
    original = {k: v.cpu() for k, v in _state(model).items()}
    with vector_added(model, vector("qwen2_hard"), 1.0, restore=open_model(str(t.target))):
        assert_bitwise_equal({k: v.cpu() for k, v in _state(model).items()}, applied, "cuda in memory")
    assert_bitwise_equal({k: v.cpu() for k, v in _state(model).items()}, original, "cuda restored")


@pytest.mark.parametrize(("threads", "chunk"), [(1, 1 << 22), (2, 64)])
def test_switch_to_goes_from_run_to_run_as_restore_then_add(trio, vector, tmp_path, threads, chunk):
    """target → +v → −v → control → target, each straight from the previous weights (computed from the
    target's files): bit for bit what restoring and then adding gives, and what apply writes."""
    from rvhub.inmemory import check_loaded, switch_to

    t = trio("qwen2_hard")
    vec = open_vector(vector("qwen2_hard"))
    src = open_model(str(t.target))
    model = _load(t.target)
    original = _state(model)
    check_loaded(model, src, sorted(original))
    control = Control(vec, "gaussian", seed=0)
    reference = _load(t.target)  # the same states, the old way: restore from copies, then add
    touched: list[str] = []
    for deltas, scale in ((vec, 1.0), (vec, -1.0), (control, 0.5), (None, 0.0), (vec, 0.25)):
        touched = switch_to(model, src, deltas, scale, touched, threads=threads, chunk_elems=chunk)
        if deltas is None:
            assert touched == []
            assert_bitwise_equal(_state(model), original, "switched back to the target")
            continue
        with vector_added(reference, deltas, scale):
            assert_bitwise_equal(_state(model), _state(reference), f"switched to {scale}")
        assert touched and touched == sorted(touched)
    applied = load_tensors(Path(apply(vector("qwen2_hard"), str(t.target), tmp_path / "o", scale=0.25,
                                      progress=False).out))
    assert_bitwise_equal(_state(model), applied, "last state vs apply")
    with pytest.raises(InvalidOptionError, match="finite"):
        switch_to(model, src, vec, math.nan, touched)


@pytest.mark.parametrize("name", ["qwen2_plain", "llama_plain"])  # tied and untied embeddings
def test_widening_from_the_files_is_a_float32_load(trio, name):
    from rvhub.inmemory import widen_from_files

    t = trio(name)
    want = _load(t.target, torch.float32)
    model = _load(t.target, torch.bfloat16)
    widened = widen_from_files(model, open_model(str(t.target)), torch.float32, chunk_elems=64)  # several blocks
    assert widened is not None and "model.embed_tokens.weight" in widened
    assert_bitwise_equal(dict(model.state_dict()), dict(want.state_dict()), "widened vs float32 load")
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), want.named_buffers(), strict=True):
        assert n1 == n2 and b1.dtype == b2.dtype and torch.equal(b1, b2)
    assert model.config.dtype == want.config.dtype == torch.float32
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (want.lm_head.weight.data_ptr() == want.model.embed_tokens.weight.data_ptr())


def test_widening_refuses_a_loader_that_changed_weights_or_a_tensor_not_in_the_files(trio):
    from rvhub.inmemory import widen_from_files

    t = trio("qwen2_plain")
    src = open_model(str(t.target))
    model = _load(t.target, torch.bfloat16)
    w = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w.data = w.data.flip(0).contiguous()  # as a loader that permutes rows would leave it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert widen_from_files(model, src, torch.float32) is None
    assert_bitwise_equal(dict(model.state_dict()), before, "unchanged after a refusal")
    assert model.config.dtype == torch.bfloat16

    model = _load(t.target, torch.bfloat16)
    model.model.register_buffer("extra", torch.ones(3, dtype=torch.bfloat16))  # persistent, not in the files
    assert widen_from_files(model, src, torch.float32) is None
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_eval_runner_in_float32_of_a_bf16_target_loads_the_float32_weights(trio, vector, monkeypatch):
    import lm_eval

    from rvhub import _runner
    from rvhub._runner import Runner

    t = trio("qwen2_plain")
    calls: list[set[str] | None] = []
    real = _runner.widen_from_files
    monkeypatch.setattr(_runner, "widen_from_files", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    options = dict(limit=None, num_fewshot=None, apply_chat_template=False, batch_size=2, gen_kwargs=None, seed=0)
    tgt = open_model(str(t.target), hash_content=False)
    runner = Runner(lm_eval, open_vector(vector("qwen2_plain")), tgt, torch.device("cpu"), "float32", None, "none",
                    0, False, options, None)
    assert len(calls) == 1 and calls[0]
    assert_bitwise_equal(dict(runner.model.state_dict()), dict(_load(t.target, torch.float32).state_dict()),
                         "runner's float32 model")

"""The trained toy family (rvhub.toy.family): deterministic, cached by recipe, a real lineage, and a vector that
transfers (the slow end-to-end test)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("trl")

from rvhub.apply import apply  # noqa: E402
from rvhub.compat import check  # noqa: E402
from rvhub.extract import extract  # noqa: E402
from rvhub.toy import build_family, tasks  # noqa: E402
from rvhub.toy.evidence import accuracy, control, extract_vector, load, mcnemar  # noqa: E402
from rvhub.toy.family import MEMBERS, TINY, recipe_key  # noqa: E402


def _hashes(paths):
    return {m: hashlib.sha256((getattr(paths, m) / "model.safetensors").read_bytes()).hexdigest() for m in MEMBERS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny recipe, built in a cache of its own (the default family below uses the user's cache)."""
    cache = tmp_path_factory.mktemp("cache-a")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RVHUB_CACHE", str(cache))
        return build_family(tmp_path_factory.mktemp("fam") / "family", 0, TINY), cache


def test_tiny_family_layout(tiny):
    paths, _ = tiny
    for m in MEMBERS:
        folder = getattr(paths, m)
        config = json.loads((folder / "config.json").read_text())
        assert config["dtype"] == "bfloat16" and config["model_type"] == "qwen2"
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        assert tok["eos_token"] == tasks.EOS
        assert (folder / "chat_template.jinja").is_file() or "chat_template" in tok
    test_rows = (paths.tasks / "test.jsonl").read_text().splitlines()
    val_rows = (paths.tasks / "validation.jsonl").read_text().splitlines()
    assert len(test_rows) >= 500 and len(val_rows) >= 300
    test_q = {json.loads(r)["question"] for r in test_rows}
    assert not test_q & {json.loads(r)["question"] for r in val_rows}
    assert not test_q & {p.question for p in tasks.problems("train", 2000)}
    yaml = (paths.tasks / "rvhub_toy.yaml").read_text()
    assert str((paths.tasks / "test.jsonl").resolve()) in yaml and "generate_until" in yaml
    assert "{{adversarial}}" in (paths.tasks / "rvhub_toy_adv.yaml").read_text()


def test_problems_and_answers_are_right():
    for p in tasks.problems("validation", 50):
        assert tasks.parse_answer(p.solution) == p.answer
        nums = [int(x) for x in p.solution.replace(".", " ").split() if x.isdigit()]
        assert nums[-1] == p.answer and p.answer >= 0
        assert p.adversarial != p.question and p.question.split(". ")[0] in p.adversarial


def test_same_seed_same_weights_and_cache_reuse(tiny, tmp_path, monkeypatch, capsys):
    paths, cache = tiny
    monkeypatch.setenv("RVHUB_CACHE", str(tmp_path / "cache-b"))  # a cold cache: trained again from scratch
    again = build_family(tmp_path / "again", 0, TINY)
    assert _hashes(again) == _hashes(paths) and again.key == paths.key
    monkeypatch.setenv("RVHUB_CACHE", str(cache))
    capsys.readouterr()
    reused = build_family(tmp_path / "reused", 0, TINY)
    assert "cached" in capsys.readouterr().out and _hashes(reused) == _hashes(paths)
    entry = build_family(None, 0, TINY)  # the cache entry itself: its YAMLs name its own data files
    for name in ("rvhub_toy.yaml", "rvhub_toy_val_adv.yaml"):
        data = re.search(r"data_files: *\[?\"?([^\"\]\n]+)", (entry.tasks / name).read_text())
        assert data and Path(data.group(1)).is_file() and Path(data.group(1)).is_relative_to(entry.tasks.resolve())


def test_changed_recipe_or_seed_gets_a_new_entry(tiny):
    paths, cache = tiny
    assert recipe_key(TINY.model_copy(update={"grpo_steps": 3}), 0) != paths.key
    assert recipe_key(TINY, 1) != paths.key
    assert recipe_key(TINY, 0) == paths.key
    assert [p.name for p in (cache / "toy-family").iterdir()] == [paths.key]


def test_lineage_check_refuses_other_and_passes_target(tiny, tmp_path):
    paths, _ = tiny
    vec = tmp_path / "vec"
    extract(str(paths.sft), str(paths.rl), vec, progress=False)
    assert check(vec, str(paths.target)).ok
    report = check(vec, str(paths.other))
    assert [f.name for f in report.failures()] == ["lineage"]


def test_in_memory_sum_equals_rvhub_apply(tiny, tmp_path):
    """evidence's target + v (rvhub.inmemory.add_vector on the loaded bf16 model) is what rvhub apply writes.

    The vector is base → sft: the tiny recipe's two GRPO steps see no reward (all groups zero-std), so its
    rl − sft is empty."""
    from safetensors.torch import load_file

    from rvhub.formats import open_vector

    paths, _ = tiny
    extract(str(paths.base), str(paths.sft), tmp_path / "vec", progress=False)
    v = open_vector(tmp_path / "vec")
    apply(tmp_path / "vec", str(paths.target), tmp_path / "merged", scale=1.0, progress=False)
    ours = load(paths.target, v, 1.0).state_dict()
    theirs = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(theirs) <= set(ours)
    assert all(ours[k].equal(theirs[k]) for k in theirs)
    before = load_file(str(paths.target / "model.safetensors"))
    assert any(not before[k].equal(theirs[k]) for k in theirs)  # the sum is not target itself
    noisy = load(paths.target, control(v), 1.0).state_dict()
    assert any(not noisy[k].equal(theirs[k]) for k in theirs)
    assert extract_vector(paths, tmp_path / "rl-sft").card.format == "sparse"


def test_lm_eval_runs_the_task_yamls_like_accuracy(tiny, monkeypatch):
    """The YAMLs load offline in lm-eval and score what :func:`accuracy` scores (runs where lm-eval is installed)."""
    lm_eval = pytest.importorskip("lm_eval")
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    paths, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(paths.sft, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(paths.sft)
    res = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=16),
                                  tasks=["rvhub_toy_val", "rvhub_toy_val_adv"], limit=16,
                                  task_manager=TaskManager(include_path=str(paths.tasks)))
    probs = tasks.problems("validation", 16)
    for task, adv in (("rvhub_toy_val", False), ("rvhub_toy_val_adv", True)):
        assert res["results"][task]["exact_match,final-answer"] == accuracy(paths.sft, probs, adversarial=adv).acc


def test_mcnemar_known_values():
    assert mcnemar([True] * 10, [False] * 10) == pytest.approx(2 / 2**10)
    assert mcnemar([True, False], [False, True]) == 1.0
    assert mcnemar([True] * 5, [True] * 5) == 1.0


@pytest.fixture(scope="module")
def default_family():
    """The default family, built once per machine in the user cache (RVHUB_CACHE): 20-26 minutes measured on a
    2-core box at load 5-7, not measured idle."""
    return build_family(None, 0)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["validation", "test"])
def test_sft_learns_the_task(default_family, split):
    """The one result of the default recipe (10) that holds on all three seeds on validation (n=300, plain):
    worked-solution SFT beats the base, by .193 / .130 / .127 on seeds 0 / 1 / 2 (McNemar p < .001 each; see
    docs/EVIDENCE.md, "Seed robustness"). Seed 0's test split (n=600): .348 -> .572."""
    probs = tasks.problems(split)
    base, sft = accuracy(default_family.base, probs), accuracy(default_family.sft, probs)
    assert sft.acc > base.acc + 0.08 and mcnemar(sft.correct, base.correct) < 0.05


@pytest.mark.slow
@pytest.mark.xfail(reason="not shown: recipe 10, seed 0, test split (n=600): target + v .283 is above target .243 "
                          "(McNemar p=.043) but not above the Gaussian control .250 (p=.095); on validation seeds 1 "
                          "and 2 show no gain (seed 2: .147 vs .220), nor does a longer pretraining (recipe 11, 800 "
                          "steps; seed 2: .680 vs .767); see docs/EVIDENCE.md, 'Seed robustness'", strict=False)
def test_the_vector_transfers_on_the_test_split(default_family, tmp_path):
    """The paper's claim on this family: target + v beats target and the norm-matched Gaussian control."""
    paths = default_family
    probs = tasks.problems("test")
    v = extract_vector(paths, tmp_path / "v")
    plain = accuracy(paths.target, probs)
    plus = accuracy(paths.target, probs, deltas=v)
    ctl = accuracy(paths.target, probs, deltas=control(v))
    assert plus.acc > ctl.acc + 0.02 and mcnemar(plus.correct, ctl.correct) < 0.05
    assert plus.acc > plain.acc + 0.02 and mcnemar(plus.correct, plain.correct) < 0.05

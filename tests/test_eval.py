"""`rvhub eval` on a tiny trained fixture (v = a learned yes/no skill), offline, with a local task YAML.

The real assertions are numbers: scores equal lm-eval's on the folders `rvhub apply` writes, +v beats the
target and the control with paired tests that say so, and the control has v's norms (test_inmemory.py).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import pytest
from eval_fixture import TASK, Trained, build_trained
from helpers import folder_snapshot, run_cli

pytest.importorskip("lm_eval")
os.environ["HF_DATASETS_OFFLINE"] = "1"

from rvhub.apply import apply  # noqa: E402
from rvhub.card import VectorCard, verify_files  # noqa: E402
from rvhub.errors import IncompatibleError, InvalidOptionError, MissingExtraError  # noqa: E402
from rvhub.eval import PLOT_FILE, evaluate_vector  # noqa: E402
from rvhub.extract import extract  # noqa: E402

BS = 64  # one forward pass per run: every request of the toy task in one batch


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return build_trained(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def vec(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained-vec") / "vec"
    extract(str(trained.sft), str(trained.rl), out, progress=False)
    return out


@pytest.fixture(scope="module")
def swept(trained: Trained, vec: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The full default eval (target, +v, −v, gaussian control) with a sweep, once for the module."""
    logs = tmp_path_factory.mktemp("eval-logs")
    report = evaluate_vector(vec, str(trained.target), [TASK], include_path=trained.tasks, scales="0.5,1",
                             batch_size=BS, output_dir=logs, progress=False)
    return report, logs


def _score(report, role, scale=None):  # type: ignore[no-untyped-def]
    rows = [r for r in report.runs if r["role"] == role and r["metric"] == "acc,none"
            and (scale is None or r["scale"] == scale)]
    assert len(rows) == 1, rows
    return rows[0]["score"]


def test_plus_beats_target_and_control(swept):  # type: ignore[no-untyped-def]
    report, _ = swept
    target, plus, control = _score(report, "target"), _score(report, "plus"), _score(report, "control")
    assert plus >= 0.95, report.runs
    assert target <= 0.75 and control <= 0.8, report.runs
    (delta,) = [d for d in report.deltas if d["metric"] == "acc"]
    tests = {t["against"]: t for t in delta["tests"]}
    assert set(tests) == {"target", "control"}
    for t in tests.values():
        assert t["method"] == "mcnemar" and t["distinguishable"] and t["p_value"] < 0.01
        assert t["plus_only"] > t["other_only"]
        # the exact McNemar p-value from its discordant counts, worked out independently
        m, k = t["plus_only"] + t["other_only"], t["other_only"]
        assert t["p_value"] == pytest.approx(min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m))
    assert delta["n"] == 40 and delta["control_kind"] == "gaussian" and delta["control_seed"] == 0
    assert [p["scale"] for p in delta["sweep"]] == [0.5, 1.0] and delta["best_scale"] == 1.0


def test_card_plot_and_logs(swept, vec):  # type: ignore[no-untyped-def]
    report, logs = swept
    card = VectorCard.read(vec)
    verify_files(vec, card)  # the manifest is valid, eval.png in it
    assert PLOT_FILE in {f.path for f in card.files}
    (d,) = [d for d in card.benchmarks if d.metric == "acc"]
    assert d.harness.version and d.harness.task_version == "1.0" and d.harness.task_hash
    assert d.harness.dtype == "float32" and d.harness.seed == 0
    assert d.scores.plus == _score(report, "plus") and d.scores.minus == _score(report, "minus")
    readme = (vec / "README.md").read_text()
    assert f"]({PLOT_FILE})" in readme and "distinguishable" in readme
    assert VectorCard.from_readme(readme) == card
    png = (vec / PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (640, 400)
    runs = sorted(p.name for p in logs.iterdir())
    assert runs == ["control_+1", "minus_-1", "plus_+1", "sweep_+0.5", "target"]
    samples = (logs / "plus_+1" / f"samples_{TASK}.jsonl").read_text().splitlines()
    assert len(samples) == 40 and json.loads(samples[0])["doc_id"] is not None


def test_scores_equal_lm_eval_on_applied_folders(swept, trained, vec, tmp_path):  # type: ignore[no-untyped-def]
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report, _ = swept
    plus = apply(vec, str(trained.target), tmp_path / "plus", progress=False).out
    tm = TaskManager(include_path=str(trained.tasks))
    for role, folder in (("target", trained.target), ("plus", plus)):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(str(folder)), batch_size=BS)
        res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
        assert res["results"][TASK]["acc,none"] == _score(report, role), role


def test_rerun_replaces_the_key_and_registry_vectors_keep_their_card(swept, trained, vec, tmp_path):  # type: ignore[no-untyped-def]
    from rvhub.registry import push

    before = len(VectorCard.read(vec).benchmarks)
    evaluate_vector(vec, str(trained.target), [TASK], include_path=trained.tasks, minus=False, control="none",
                    limit=8, batch_size=BS, progress=False)
    card = VectorCard.read(vec)
    assert len(card.benchmarks) == before
    (d,) = [d for d in card.benchmarks if d.metric == "acc"]
    assert d.n == 8 and d.scores.minus is None and d.scores.control is None and d.harness.limit == 8
    verify_files(vec, card)

    registry = tmp_path / "registry"
    push(vec, "me/toy", registry=registry, progress=False)
    report = evaluate_vector("me/toy", str(trained.target), [TASK], include_path=trained.tasks, minus=False,
                             control="none", limit=4, batch_size=BS, registry=registry, progress=False)
    assert not report.card_written and report.notes and _score(report, "plus") == 1.0
    pulled = Path(report.vector)  # push uploaded the plot (it is in the manifest), pull verified it
    assert (pulled / PLOT_FILE).read_bytes() == (vec / PLOT_FILE).read_bytes()


# ---------------------------------------------------------------- bad input


def test_bad_options_are_refused_before_any_run(trained, vec):  # type: ignore[no-untyped-def]
    snap = folder_snapshot(vec)
    base = str(trained.target)
    with pytest.raises(InvalidOptionError, match="finite"):
        evaluate_vector(vec, base, [TASK], scales="0.5,nan", include_path=trained.tasks)
    with pytest.raises(InvalidOptionError, match="finite"):
        evaluate_vector(vec, base, [TASK], scales="1,inf", include_path=trained.tasks)
    with pytest.raises(InvalidOptionError, match="gaussian, permute, none"):
        evaluate_vector(vec, base, [TASK], control="uniform", include_path=trained.tasks)
    with pytest.raises(InvalidOptionError, match=str(trained.tasks)) as err:
        evaluate_vector(vec, base, ["no_such_task"], include_path=trained.tasks)
    assert "built-in tasks" in str(err.value) and "no_such_task" in str(err.value)
    assert folder_snapshot(vec) == snap


def test_incompatible_base_is_refused_unless_forced(trained, vec, tmp_path):  # type: ignore[no-untyped-def]
    from rvhub.toy import build_model, to_float32

    stranger = to_float32(build_model(tmp_path / "bf16", "qwen2", seed=99, hidden=64, vocab=128), tmp_path / "s")
    snap = folder_snapshot(vec)
    with pytest.raises(IncompatibleError):
        evaluate_vector(vec, str(stranger), [TASK], include_path=trained.tasks)
    assert folder_snapshot(vec) == snap
    report = evaluate_vector(vec, str(stranger), [TASK], include_path=trained.tasks, force=True, minus=False,
                             control="none", limit=4, batch_size=BS, write_card=False, progress=False)
    assert len(report.runs) == 2


def test_empty_vector_refuses_minus_and_control(trained, tmp_path):  # type: ignore[no-untyped-def]
    extract(str(trained.sft), str(trained.sft), tmp_path / "empty", progress=False)
    assert not VectorCard.read(tmp_path / "empty").tensors
    for kw in ({}, {"minus": False}, {"control": "none"}):
        with pytest.raises(InvalidOptionError, match="has none"):
            evaluate_vector(tmp_path / "empty", str(trained.target), [TASK], include_path=trained.tasks, **kw)


def test_missing_extra_says_how_to_install(trained, vec, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'rvhub\[eval\]'"):
        evaluate_vector(vec, str(trained.target), [TASK])


def test_interrupted_eval_leaves_the_card_as_it_was(trained, vec, monkeypatch):  # type: ignore[no-untyped-def]
    from rvhub import _runner

    snap = folder_snapshot(vec)
    calls = []
    real = _runner.Runner._evaluate

    def flaky(self, run, task):  # type: ignore[no-untyped-def]
        calls.append(run.role)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, run, task)

    monkeypatch.setattr(_runner.Runner, "_evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate_vector(vec, str(trained.target), [TASK], include_path=trained.tasks, limit=4, batch_size=BS,
                        progress=False)
    assert calls == ["target", "plus"]
    assert folder_snapshot(vec) == snap


def test_cli_refuses_a_non_finite_scale_in_one_line(vec, trained):  # type: ignore[no-untyped-def]
    r = run_cli("eval", vec, "--base", trained.target, "--tasks", TASK, "--scales", "1,inf")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "--scales" in r.stderr and "finite" in r.stderr


@pytest.mark.gpu
def test_cuda_eval_gives_the_cpu_scores(swept, trained, vec):  # type: ignore[no-untyped-def]
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    report, _ = swept
    cuda = evaluate_vector(vec, str(trained.target), [TASK], include_path=trained.tasks, minus=False,
                           control="none", batch_size=BS, device="cuda", write_card=False, progress=False)
    for role in ("target", "plus"):
        assert _score(cuda, role) == _score(report, role)


def test_help_mentions_every_option():
    from typer.testing import CliRunner

    from rvhub.cli import app

    result = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "100", "TERMINAL_WIDTH": "100"})
    assert result.exit_code == 0
    for option in ("--base", "--tasks", "--scale", "--scales", "--control", "--control-seed", "--no-minus",
                   "--include-path", "--limit", "--num-fewshot", "--apply-chat-template", "--batch-size",
                   "--gen-kwargs", "--seed", "--device", "--dtype", "--output-dir", "--force", "--json", "--quiet"):
        assert option in result.stdout, option
    assert "org/name[@rev]" in result.stdout and "rvhub[eval]" in result.stdout


def test_local_tasks_skip_indexing_lm_evals_own_but_built_in_names_still_resolve(trained):  # type: ignore[no-untyped-def]
    import lm_eval

    from rvhub.eval import _task_manager

    local = _task_manager(lm_eval, trained.tasks, [TASK])
    assert TASK in local.all_subtasks and "arc_easy" not in local.all_tasks  # only the local folder was indexed
    both = _task_manager(lm_eval, trained.tasks, [TASK, "arc_easy"])
    assert {TASK, "arc_easy"} <= set(both.all_tasks)
    assert _task_manager(lm_eval, trained.tasks, [TASK]) is local  # once per process


def test_a_task_built_once_gives_fresh_simple_evaluate_per_sample_results(trained, vec, tmp_path):  # type: ignore[no-untyped-def]
    """The runner builds each task once and calls lm-eval's evaluate per run: every run's per-sample results
    (and scores, n, task hash) equal a fresh simple_evaluate of the same weights, also for runs after the
    first and for a run that comes back to the target."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rvhub._runner import Runner
    from rvhub.eval import Run
    from rvhub.formats import open_vector
    from rvhub.inmemory import switch_to
    from rvhub.sources import open_model

    tm = TaskManager(include_path=str(trained.tasks), include_defaults=False)
    options = dict(limit=None, num_fewshot=None, apply_chat_template=False, batch_size=BS, gen_kwargs=None, seed=0)
    tgt = open_model(str(trained.target), hash_content=False)
    runner = Runner(lm_eval, open_vector(vec), tgt, torch.device("cpu"), None, tm, "none", 0, False, options, None)
    plus_folder = apply(vec, str(trained.target), tmp_path / "plus", progress=False).out
    touched: list[str] = []
    for run, folder in ((Run("target", 0.0), trained.target), (Run("plus", 1.0), plus_folder),
                        (Run("minus", -1.0), None), (Run("target", 0.0), trained.target)):
        touched = switch_to(runner.model, tgt, runner.vec if run.role != "target" else None, run.scale, touched)
        ours = runner._evaluate(run, TASK)
        if folder is None:
            continue
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(str(folder)), batch_size=BS)
        res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(trained.tasks)),
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        by_doc = {s["doc_id"]: float(s["acc"]) for s in res["samples"][TASK] if s["filter"] == "none"}
        assert ours.per_sample["acc,none"] == by_doc, run
        assert ours.scores["acc,none"] == res["results"][TASK]["acc,none"], run
        assert ours.n == res["n-samples"][TASK]["effective"] and ours.num_fewshot == 0
        assert ours.task_hash is not None and ours.version == "1.0"
    assert len(runner._tasks) == 1  # built once

"""The eval fields of the card: additive (cards written before them load), re-runs replace their key, the plot
joins the file manifest. No lm-eval needed."""

from __future__ import annotations

import hashlib
import shutil

from rvhub.card import BenchmarkDelta, PairedTest, Scores, SweepPoint, VectorCard, verify_files
from rvhub.eval import PLOT_FILE, write_deltas

OLD_DELTA = {  # a delta as rvhub wrote it before the eval fields existed
    "benchmark": "gsm8k", "metric": "exact_match", "higher_is_better": True, "n": 100,
    "harness": {"name": "lm-evaluation-harness", "version": "0.4.8", "num_fewshot": 5, "chat_template": None,
                "chat_template_sha256": None, "fewshot_as_multiturn": None, "system_instruction": None,
                "prompt": None, "filter": "strict-match"},
    "target": "org/model", "scale": 1.0, "scores": {"target": 0.5, "plus": 0.6, "minus": None, "control": None},
    "stderr": None,
}


def _delta(plus: float, n: int) -> BenchmarkDelta:
    return BenchmarkDelta(
        benchmark="gsm8k", metric="exact_match", n=n, target="org/model", scores=Scores(target=0.5, plus=plus),
        harness={"filter": "strict-match", "task_version": "3.0", "seed": 0},  # type: ignore[arg-type]
        control_kind="gaussian", control_seed=0,
        tests=[PairedTest(against="target", method="mcnemar", n=n, diff=plus - 0.5, p_value=0.01, mid_p=0.008,
                          plus_only=12, other_only=2, distinguishable=True)],
        sweep=[SweepPoint(scale=0.5, score=0.55), SweepPoint(scale=1.0, score=plus)], best_scale=1.0,
    )


def test_old_delta_loads_with_defaults():
    d = BenchmarkDelta.model_validate(OLD_DELTA)
    assert d.tests == [] and d.sweep == [] and d.control_kind is None and d.harness.task_hash is None


def test_write_deltas_replaces_the_key_and_lists_the_plot(vector, tmp_path):
    vec = shutil.copytree(vector("qwen2_plain"), tmp_path / "vec")
    old = BenchmarkDelta.model_validate(OLD_DELTA)
    other = old.model_copy(update={"benchmark": "arc_easy"})
    card = VectorCard.read(vec)
    VectorCard.model_validate({**card.model_dump(), "benchmarks": [old, other]}).write(vec)

    plot = b"\x89PNG\r\n\x1a\nnot really a png"
    write_deltas(vec, [_delta(0.7, 100)], plot)
    card = VectorCard.read(vec)
    assert [d.benchmark for d in card.benchmarks] == ["arc_easy", "gsm8k"]
    assert card.benchmarks[1].scores.plus == 0.7 and card.benchmarks[1].tests[0].distinguishable
    (entry,) = [f for f in card.files if f.path == PLOT_FILE]
    assert entry.sha256 == hashlib.sha256(plot).hexdigest()
    verify_files(vec, card)
    readme = (vec / "README.md").read_text()
    assert f"]({PLOT_FILE})" in readme and "mcnemar (12/2 discordant)" in readme and "best α = 1" in readme
    assert VectorCard.from_readme(readme) == card

    write_deltas(vec, [_delta(0.65, 50)], b"\x89PNG\r\n\x1a\nanother")  # a re-run replaces, never duplicates
    card = VectorCard.read(vec)
    assert [d.n for d in card.benchmarks] == [100, 50] and len([f for f in card.files if f.path == PLOT_FILE]) == 1
    verify_files(vec, card)

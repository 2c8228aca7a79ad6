"""The quickly testable pieces of scripts/demo.py: reading lm-eval's per-sample logs, choosing the
"wrong for target, right for target + v" problems, and the accuracy table and verdict from an eval report.
The whole demo (which trains or reuses the toy family) is not run here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rvhub.card import BenchmarkDelta, PairedTest, Scores

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rvhub_demo_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _sample(doc_id: int, correct: bool, *, filt: str = "final-answer", response: str = "") -> dict[str, Any]:
    """One record as lm-eval's evaluator logs it (the fields the demo reads, and a few it does not)."""
    return {"doc_id": doc_id, "doc": {"question": f"q{doc_id}", "adversarial": "x", "answer": str(doc_id)},
            "target": str(doc_id), "arguments": [["Q: …", {}]], "resps": [[response or f"r{doc_id}"]],
            "filtered_resps": [str(doc_id) if correct else "[invalid]"], "filter": filt,
            "metrics": ["exact_match"], "doc_hash": "h", "exact_match": 1.0 if correct else 0.0}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return path


def test_read_samples_keeps_one_filter_and_the_first_response(demo: ModuleType, tmp_path: Path) -> None:
    rows = [_sample(0, True, response="1 + 2 = 3. The answer is 3."), _sample(0, False, filt="none"),
            _sample(1, False)]
    got = demo.read_samples(_write(tmp_path / "s.jsonl", rows))
    assert sorted(got) == [0, 1]
    assert got[0] == demo.Sample(0, "q0", "0", "1 + 2 = 3. The answer is 3.", True)
    assert got[1].correct is False and got[1].response == "r1"
    assert demo.read_samples(tmp_path / "s.jsonl", "none")[0].correct is False


def test_wrong_to_right_takes_the_first_k_in_test_order_and_counts_all(demo: ModuleType) -> None:
    def runs(pattern: str) -> dict[int, Any]:  # "1" right, "0" wrong, "-" missing
        return {i: demo.Sample(i, f"q{i}", "a", "r", c == "1") for i, c in enumerate(pattern) if c != "-"}

    target = runs("0101000-0")
    merged = runs("1111-0110")
    chosen, total = demo.wrong_to_right(target, merged, 2)
    # wrong → right: 0, 2, 6 (4 and 7 are missing in one run, 5 stays wrong, 1 and 3 were right already)
    assert total == 3
    assert [(t.doc_id, m.doc_id) for t, m in chosen] == [(0, 0), (2, 2)]
    assert all(not t.correct and m.correct for t, m in chosen)
    assert demo.wrong_to_right(target, merged, 10)[0][-1][0].doc_id == 6
    assert demo.wrong_to_right(merged, merged, 3) == ([], 0)  # no such problem: nothing is made up


def _report(plus: float, p_target: float, p_control: float, *, minus: float = 0.30) -> dict[str, Any]:
    tests = [PairedTest(against=a, method="mcnemar", n=200, diff=plus - base, p_value=p, distinguishable=p < 0.05)
             for a, base, p in (("target", 0.35, p_target), ("control", 0.34, p_control))]
    d = BenchmarkDelta(benchmark="rvhub_toy", metric="exact_match", n=200, target="t", scale=1.0,
                       scores=Scores(target=0.35, plus=plus, minus=minus, control=0.34),
                       stderr=Scores(target=0.034, plus=0.035, minus=0.032, control=0.0335), tests=tests)
    return {"scale": 1.0, "deltas": [d.model_dump(mode="json")]}


def test_accuracy_table_has_every_run_stderr_and_both_p_values(demo: ModuleType) -> None:
    lines = demo.accuracy_table(_report(0.42, 0.0123, 0.5))
    assert lines[0] == ("| task | n | target | +1·v | −1·v | control (+1·r) | p (+v vs target) | "
                        "p (+v vs control) |")
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[2] == ("| rvhub_toy | 200 | 0.350 ± 0.034 | 0.420 ± 0.035 | 0.300 ± 0.032 | 0.340 ± 0.034 | "
                        "0.012 | 0.5 |")


def test_verdict_says_plainly_whether_the_transfer_shows(demo: ModuleType) -> None:
    shown = demo.verdict(_report(0.42, 0.001, 0.002))
    assert "+v beats target (+0.070, p = 0.001)" in shown[0]
    assert "+v beats the random control (+0.080, p = 0.002)" in shown[0]
    assert "−v moves the score by -0.050" in shown[0]
    assert shown[-1].startswith("The transfer shows")
    not_shown = demo.verdict(_report(0.36, 0.8, 0.01, minus=0.36))
    assert "+v is not distinguishable from target (+0.010, p = 0.8)" in not_shown[0]
    assert "−v moves the score by +0.010" in not_shown[0]
    assert not_shown[-1].startswith("The transfer does not show")
    worse = demo.verdict(_report(0.20, 0.001, 0.001))
    assert "+v is worse than target" in worse[0] and worse[-1].startswith("The transfer does not show")

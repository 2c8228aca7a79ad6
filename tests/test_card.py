"""The card: rvhub.json and README.md written together and agreeing, README → card identity (hypothesis),
the Hub metadata, the JSON Schema in cards/, errors for malformed cards, benchmark deltas by hand and from
lm-evaluation-harness results, and the `rvhub card` command."""

from __future__ import annotations

import base64
import json
import socket
import struct
from pathlib import Path

import pytest
import yaml
from helpers import copy_folder, folder_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rvhub.benchmarks import edit_card, import_lm_eval
from rvhub.card import (
    HUB_ID_PATTERN,
    ArchitectureFingerprint,
    BenchmarkDelta,
    CompressionReport,
    ConfigFingerprint,
    Fingerprints,
    HarnessSettings,
    LineageSketch,
    ModelRef,
    ModuleReport,
    Scores,
    SketchTensor,
    TensorShape,
    TokenizerFingerprint,
    VectorCard,
    architecture_sha256,
    canonical_sha256,
)
from rvhub.cli import app
from rvhub.errors import InvalidOptionError, VectorFormatError
from rvhub.formats import VectorFolder

SHA = "ab" * 32


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- cards built in code


def _delta(**changes) -> BenchmarkDelta:
    fields = dict(
        benchmark="gsm8k", metric="exact_match", n=1319, target="Qwen/Qwen2.5-1.5B-Instruct", scale=1.0,
        harness=HarnessSettings(version="0.4.8", num_fewshot=5, chat_template=True, filter="strict-match"),
        scores=Scores(target=0.62, plus=0.669, minus=0.501, control=0.618),
    )
    return BenchmarkDelta(**{**fields, **changes})


def _report() -> CompressionReport:
    return CompressionReport(
        svd="randomized", rule="energy", rule_value=0.9, embeddings="residual", adapter_dtype="BF16",
        residual_format="sparse",
        modules=[ModuleReport(name="model.layers.0.mlp.up_proj.weight", shape=(128, 64), rank=8, energy=0.91,
                              rel_error=0.3, params=8 * 192)],
        residual=["model.embed_tokens.weight", "model.norm.weight"], total_sq_norm=2.5, adapter_energy=0.7,
        residual_energy=0.2, dropped_energy=0.1, rel_error=0.316, adapter_params=1536, adapter_bytes=3072,
        residual_bytes=1000, vector_bytes=60000,
    )


# ---------------------------------------------------------------- README ↔ card


def test_extract_writes_card_and_readme_that_agree(vector, trio, no_network):
    from rvhub.compat import shape_hash
    from rvhub.sources import open_model

    vec = vector("qwen2_plain")
    card = VectorCard.read(vec)
    readme = (vec / "README.md").read_text()
    assert VectorCard.from_readme(readme) == card
    assert card.to_readme() == readme  # rendering is deterministic and offline (no_network)
    meta = _front_matter(readme)
    # local sources: no Hub base model to name; sparse form: no peft; the fit tags of the `from` model
    fp = card.fingerprints
    assert fp is not None and fp.architecture.model_type == "qwen2"
    assert fp.architecture.shape_hash == shape_hash(open_model(str(trio("qwen2_plain").sft), hash_content=False))
    assert meta["tags"] == ["reasoning-vector", "task-vector", "rvhub", f"rvhub-shape-{fp.architecture.shape_hash}",
                            "rvhub-arch-qwen2"]
    assert "base_model" not in meta and "library_name" not in meta and "model-index" not in meta
    assert [t.name for t in fp.architecture.tensors] == [t.name for t in card.tensors]
    assert fp.config.values["rope.rope_theta"] == 10000.0 and fp.config.values["vocab_size"] == 128
    assert fp.tokenizer is not None and fp.tokenizer.added_tokens == ["<unk>", "<|endoftext|>", "<|sft|>"]
    assert sum(n for t in fp.lineage.tensors for _, n in t.spans) > 1000


def test_readme_metadata_and_body(vector, tmp_path, no_network):
    base = VectorCard.read(vector("qwen2_plain"))
    card = base.model_copy(update={
        "format": "lora", "compression": _report(), "license": "apache-2.0", "recommended_scale": 0.8,
        "recommended_bases": ["Qwen/Qwen2.5-1.5B-Instruct"],
        "benchmarks": [_delta(), _delta(benchmark="bbh", metric="acc", scores=Scores(target=0.4, plus=0.52))],
    })
    readme = card.to_readme(repo_id="me/math-vector")
    meta = _front_matter(readme)
    assert meta["base_model"] == ["Qwen/Qwen2.5-1.5B-Instruct"] and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert meta["tags"][:4] == ["reasoning-vector", "task-vector", "rvhub", "lora"]
    assert [t.split("-")[1] for t in meta["tags"][4:]] == ["shape", "arch"]
    results = meta["model-index"][0]["results"]
    assert [(r["dataset"]["type"], r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in results] == [
        ("gsm8k", "exact_match", 0.669), ("bbh", "acc", 0.52)]
    body = readme.split("---\n", 2)[2]
    assert "rvhub apply me/math-vector --base Qwen/Qwen2.5-1.5B-Instruct -o merged/ --scale 0.8" in body
    assert 'PeftModel.from_pretrained(model, "me/math-vector")' in body
    # the deltas table: target, +αv with its difference, −αv, the control
    row = next(line for line in body.splitlines() if line.startswith("| gsm8k"))
    assert "| 0.62 |" in row and "0.669 (α=1: +0.049)" in row and "0.501 (-0.119)" in row and "0.618 (-0.002)" in row
    assert "5-shot" in row and "chat template" in row and "filter strict-match" in row
    assert "Only the rows with a control show one." in body  # bbh has none
    assert "| ‖v‖² carried by the LoRA factors | 70.00% |" in body
    assert "| relative error ‖v − v̂‖ / ‖v‖ | 0.316 |" in body
    assert "`rope.rope_theta` = `10000.0`" in body
    assert VectorCard.from_readme(readme) == card


def test_card_write_keeps_the_manifest_valid(vector, tmp_path):
    vec = copy_folder(vector("qwen2_plain"), tmp_path / "vec")
    weights = {k: v for k, v in folder_snapshot(vec).items() if k not in ("rvhub.json", "README.md")}
    card = edit_card(vec, license="mit", delta={
        "benchmark": "gsm8k", "metric": "exact_match", "target": "me/target",
        "scores": {"target": 0.5, "plus": 0.55, "control": 0.51},
    })
    assert card.license == "mit" and card.benchmarks[0].scale == 1.0
    assert VectorCard.read(vec) == card == VectorCard.from_readme((vec / "README.md").read_text())
    assert {k: v for k, v in folder_snapshot(vec).items() if k not in ("rvhub.json", "README.md")} == weights
    assert not [p for p in vec.iterdir() if p.name.startswith(".")], "temporary files left behind"
    VectorFolder(vec)  # every manifest file still verifies
    # a delta with the same benchmark, metric, filter and target replaces the old one
    again = edit_card(vec, delta={"benchmark": "gsm8k", "metric": "exact_match", "target": "me/target",
                                  "scores": {"target": 0.5, "plus": 0.6}})
    assert [d.scores.plus for d in again.benchmarks] == [0.6]


# ---------------------------------------------------------------- hypothesis: card → README → card

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_name = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20)
_float = st.floats(allow_nan=False, allow_infinity=False)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _float | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)
_hub_id = st.from_regex(HUB_ID_PATTERN, fullmatch=True).filter(lambda s: len(s) < 40)
_sha = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
_shape = st.lists(st.integers(0, 10**6), max_size=3).map(tuple)


@st.composite
def _sketch(draw) -> SketchTensor:
    spans = draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 5)), max_size=3))
    values = draw(st.lists(st.floats(width=32, allow_nan=False), min_size=sum(n for _, n in spans),
                           max_size=sum(n for _, n in spans)))
    raw = struct.pack(f"<{len(values)}f", *values)
    return SketchTensor(name=draw(_name), shape=draw(_shape), spans=spans, values=base64.b64encode(raw).decode())


@st.composite
def _fingerprints(draw) -> Fingerprints:
    model_type = draw(st.none() | _name)
    tensors = draw(st.lists(st.builds(TensorShape, name=_name, shape=_shape), max_size=3, unique_by=lambda t: t.name))
    values = draw(st.dictionaries(_text, _json, max_size=4))
    tok = draw(st.none() | st.builds(
        TokenizerFingerprint, source=st.sampled_from(["tokenizer.json", "tokenizer.model"]),
        vocab_size=st.integers(0, 10**6), vocab_sha256=_sha, added_tokens=st.lists(_text, max_size=3),
        special_tokens=st.dictionaries(_text, _text, max_size=2), added_sha256=_sha,
    ))
    return Fingerprints(
        architecture=ArchitectureFingerprint(model_type=model_type, tensors=tensors,
                                             sha256=architecture_sha256(model_type, tensors)),
        config=ConfigFingerprint(values=values, sha256=canonical_sha256(values)),
        tokenizer=tok,
        lineage=LineageSketch(seed=draw(st.integers(0, 2**32)), tensors=draw(st.lists(_sketch(), max_size=2))),
    )


_harness = st.builds(
    HarnessSettings, name=_name, version=st.none() | _text, num_fewshot=st.none() | st.integers(0, 25),
    chat_template=st.none() | st.booleans(), chat_template_sha256=st.none() | _text,
    fewshot_as_multiturn=st.none() | st.booleans(), system_instruction=st.none() | _text,
    prompt=st.none() | _text, filter=st.none() | _text,
)
_scores = st.builds(Scores, target=_float, plus=_float, minus=st.none() | _float, control=st.none() | _float)
_deltas = st.builds(
    BenchmarkDelta, benchmark=_name, metric=_name, higher_is_better=st.booleans(), n=st.none() | st.integers(1, 10**6),
    harness=_harness, target=_name, scale=_float, scores=_scores, stderr=st.none() | _scores,
)
_ref = st.builds(ModelRef, kind=st.sampled_from(["hub", "local"]), id=_name, revision=st.none() | _text,
                 commit=st.none() | _text, content_sha256=st.none() | _sha)


@st.composite
def _cards(draw) -> VectorCard:
    lora = draw(st.booleans())
    return VectorCard(
        format="lora" if lora else draw(st.sampled_from(["sparse", "dense"])),
        values_dtype=draw(st.sampled_from(["source", "BF16", "F32"])),
        exact=draw(st.booleans()),
        source_from=draw(_ref), source_to=draw(_ref),
        model_type=draw(st.none() | _name),
        tie_word_embeddings=draw(st.booleans()),
        tensors=[], files=[],
        compression=_report() if lora else None,
        recommended_scale=draw(_float),
        recommended_bases=draw(st.lists(_hub_id, max_size=2)),
        fingerprints=draw(st.none() | _fingerprints()),
        benchmarks=draw(st.lists(_deltas, max_size=3)),
        license=draw(st.none() | st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,12}", fullmatch=True)),
    )


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cards())
def test_card_to_readme_to_card_is_the_identity(card):
    readme = card.to_readme()
    assert VectorCard.from_readme(readme) == card
    _front_matter(readme)  # the metadata stays valid YAML whatever the strings hold


# ---------------------------------------------------------------- schema and malformed cards


def test_json_schema_in_cards_is_current():
    from rvhub._schema import SCHEMA_FILE, card_schema

    assert SCHEMA_FILE.read_text(encoding="utf-8") == card_schema(), "run: python -m rvhub._schema"
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["additionalProperties"] is False
    assert {"fingerprints", "benchmarks", "recommended_scale", "license"} <= set(schema["properties"])


def _edited(vector, tmp_path, edit) -> Path:
    vec = copy_folder(vector("qwen2_plain"), tmp_path / "vec")
    card = json.loads((vec / "rvhub.json").read_text())
    edit(card)
    (vec / "rvhub.json").write_text(json.dumps(card))
    return vec


@pytest.mark.parametrize("edit,field,says", [
    (lambda c: c.update(format="zip"), "format", ["format", "'sparse', 'dense' or 'lora'", '"zip"']),
    (lambda c: c.update(recommended_scale="big"), "recommended_scale", ["recommended_scale", "number"]),
    (lambda c: c.update(licence="mit"), "licence", ["licence", "unknown field", "license"]),
    (lambda c: c.pop("source_from"), "source_from", ["source_from", "required"]),
    (lambda c: c.update(recommended_bases=["not a repo"]), "recommended_bases.0", ["recommended_bases.0"]),
    (lambda c: c["fingerprints"]["config"]["values"].update(vocab_size=7), "fingerprints.config",
     ["fingerprints.config", "hand-edited"]),
    (lambda c: c.update(benchmarks=[{"benchmark": "gsm8k", "metric": "acc", "target": "t",
                                     "scores": {"target": 0.5, "plus": "high"}}]),
     "benchmarks.0.scores.plus", ["benchmarks.0.scores.plus", "number"]),
    (lambda c: c.update(schema_version=4, rvhub_version="9.0"), "schema_version",
     ["schema_version 4", "rvhub 9.0", "reads schema versions 1, 2 and 3", "newer rvhub"]),
])
def test_malformed_card_names_the_field(vector, tmp_path, edit, field, says):
    vec = _edited(vector, tmp_path, edit)
    with pytest.raises(VectorFormatError) as err:
        VectorCard.read(vec)
    assert err.value.field == field
    for fragment in says:
        assert fragment in str(err.value), f"{fragment!r} not in {err.value}"


def test_readme_without_an_embedded_card():
    with pytest.raises(VectorFormatError, match="expected an embedded rvhub card"):
        VectorCard.from_readme("# just a README\n")


# ---------------------------------------------------------------- lm-evaluation-harness results


def _lm_eval(model: str, strict: float, flexible: float, *, shots: int = 5, chat: bool = True, n: int = 1319) -> dict:
    """Shaped like lm-evaluation-harness 0.4's results_<date>.json for `--tasks gsm8k` (trimmed)."""
    return {
        "results": {"gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": strict, "exact_match_stderr,strict-match": 0.0133,
            "exact_match,flexible-extract": flexible, "exact_match_stderr,flexible-extract": "N/A",
        }},
        "group_subtasks": {"gsm8k": []},
        "configs": {"gsm8k": {
            "task": "gsm8k", "tag": ["math_word_problems"], "dataset_path": "gsm8k", "dataset_name": "main",
            "test_split": "test", "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
            "num_fewshot": shots, "output_type": "generate_until",
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "filter_list": [{"name": "strict-match"}, {"name": "flexible-extract"}],
        }},
        "versions": {"gsm8k": 3.0},
        "n-shot": {"gsm8k": shots},
        "higher_is_better": {"gsm8k": {"exact_match": True}},
        "n-samples": {"gsm8k": {"original": 1319, "effective": n}},
        "config": {"model": "hf", "model_args": f"pretrained={model},dtype=bfloat16", "batch_size": "auto",
                   "limit": None, "random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234, "fewshot_seed": 1234},
        "git_hash": "a1b2c3d",
        "date": 1735689600.0,
        "transformers_version": "4.47.0",
        "lm_eval_version": "0.4.8",
        "chat_template": "{% for message in messages %}...{% endfor %}" if chat else None,
        "chat_template_sha": "5f0c" * 16 if chat else None,
        "system_instruction": None,
        "system_instruction_sha": None,
        "fewshot_as_multiturn": chat,
        "model_name": model,
        "model_name_sanitized": model.replace("/", "__"),
        "start_time": 1.0, "end_time": 2.0, "total_evaluation_time_seconds": "1.0",
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def test_lm_eval_import(tmp_path):
    target = _write(tmp_path / "t.json", _lm_eval("Qwen/Qwen2.5-1.5B-Instruct", 0.62, 0.64))
    plus = _write(tmp_path / "p.json", _lm_eval("/data/merged-plus", 0.669, 0.68))
    minus = _write(tmp_path / "m.json", _lm_eval("/data/merged-minus", 0.501, 0.52))
    control = _write(tmp_path / "c.json", _lm_eval("/data/merged-random", 0.618, 0.63))

    deltas = import_lm_eval(target, plus, minus, control, scale=0.5)

    assert [(d.benchmark, d.metric, d.harness.filter) for d in deltas] == [
        ("gsm8k", "exact_match", "flexible-extract"), ("gsm8k", "exact_match", "strict-match")]
    strict = deltas[1]
    assert strict.scores == Scores(target=0.62, plus=0.669, minus=0.501, control=0.618)
    assert strict.stderr == Scores(target=0.0133, plus=0.0133, minus=0.0133, control=0.0133)
    assert deltas[0].stderr is None  # "N/A" in the harness output
    assert strict.target == "Qwen/Qwen2.5-1.5B-Instruct" and strict.scale == 0.5 and strict.n == 1319
    h = strict.harness
    assert (h.name, h.version, h.num_fewshot, h.chat_template, h.fewshot_as_multiturn) == (
        "lm-evaluation-harness", "0.4.8", 5, True, True)
    assert h.chat_template_sha256 == "5f0c" * 16 and h.prompt == "Question: {{question}}\nAnswer:"


def test_lm_eval_import_refuses_runs_with_other_settings(tmp_path):
    target = _write(tmp_path / "t.json", _lm_eval("Qwen/Qwen2.5-1.5B-Instruct", 0.62, 0.64))
    plus = _write(tmp_path / "p.json", _lm_eval("/data/merged", 0.669, 0.68, shots=8))
    with pytest.raises(InvalidOptionError, match=r"--lm-eval-plus.*num_fewshot.*\(5, 8\)"):
        import_lm_eval(target, plus)
    with pytest.raises(InvalidOptionError, match="--task.*gsm8k"):
        import_lm_eval(target, target, tasks=["mmlu"])
    not_results = _write(tmp_path / "x.json", {"scores": 1})
    with pytest.raises(InvalidOptionError, match="not an lm-evaluation-harness results file"):
        import_lm_eval(not_results, target)


def test_card_command_imports_lm_eval_and_rerenders(vector, tmp_path):
    vec = copy_folder(vector("qwen2_plain"), tmp_path / "vec")
    target = _write(tmp_path / "t.json", _lm_eval("Qwen/Qwen2.5-1.5B-Instruct", 0.62, 0.64))
    plus = _write(tmp_path / "p.json", _lm_eval("/data/merged", 0.669, 0.68))
    runner = CliRunner()
    result = runner.invoke(app, ["card", str(vec), "--lm-eval-target", str(target), "--lm-eval-plus", str(plus),
                                 "--license", "apache-2.0", "--base-model", "Qwen/Qwen2.5-1.5B-Instruct",
                                 "--scale", "0.5"])
    assert result.exit_code == 0, result.output
    assert "gsm8k exact_match on Qwen/Qwen2.5-1.5B-Instruct: 0.62 → +αv 0.669 (+0.049)" in result.stdout
    card = VectorCard.read(vec)
    assert [d.scores.plus for d in card.benchmarks] == [0.68, 0.669] and card.benchmarks[0].scale == 0.5
    meta = _front_matter((vec / "README.md").read_text())
    assert meta["base_model"] == ["Qwen/Qwen2.5-1.5B-Instruct"] and meta["license"] == "apache-2.0"
    [gsm8k] = meta["model-index"][0]["results"]  # one task and dataset, two filters
    assert [(m["config"], m["value"]) for m in gsm8k["metrics"]] == [
        ("flexible-extract", 0.68), ("strict-match", 0.669)]
    assert "A delta without a norm-matched random-vector control is weak evidence" in (vec / "README.md").read_text()

    shown = runner.invoke(app, ["card", str(vec), "--json"])
    assert shown.exit_code == 0 and VectorCard.model_validate(json.loads(shown.stdout)) == card

    by_hand = runner.invoke(app, ["card", str(vec), "--benchmark", "bbh", "--metric", "acc", "--target", "t/m",
                                  "--score-target", "0.4", "--score-plus", "0.52", "--score-control", "0.41",
                                  "--num-fewshot", "3", "--no-chat-template", "--n", "6511"])
    assert by_hand.exit_code == 0, by_hand.output
    bbh = VectorCard.read(vec).benchmarks[-1]
    assert (bbh.benchmark, bbh.scores.control, bbh.n, bbh.harness.num_fewshot, bbh.harness.chat_template) == (
        "bbh", 0.41, 6511, 3, False)

    bad = runner.invoke(app, ["card", str(vec), "--benchmark", "bbh", "--score-plus", "0.5"])
    assert bad.exit_code == 1 and "benchmark delta field metric" in bad.stderr


def test_the_wheel_carries_the_card_template(tmp_path: Path) -> None:
    """A non-editable install has no cards/ folder beside the package: the template must be inside it."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".venv", ".bench", ".git", "demo-out", "build",
                                                             "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("rvhub-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in ("vector-card.md", "vector-card.schema.json"):
            assert z.read(f"rvhub/cards/{name}") == (root / "cards" / name).read_bytes()

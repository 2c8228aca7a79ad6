"""Compatibility fingerprints and `rvhub check`: a sibling passes, an independent initialisation, a changed
rope_theta or tokenizer are flagged; `check` exit codes and JSON; `apply` refuses a failing target unless
forced, leaving no output."""

from __future__ import annotations

import json

import pytest
from helpers import assert_no_output, cache_hub_repo, copy_folder, edit_json, load_tensors
from typer.testing import CliRunner

from rvhub.apply import apply
from rvhub.card import VectorCard
from rvhub.cli import app
from rvhub.compat import LINEAGE_FAIL, check, config_values
from rvhub.errors import IncompatibleError
from rvhub.toy import build_model, save_tokenizer


def _by_name(report):
    return {c.name: c for c in report.checks}


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    """Same architecture, shapes, config and tokenizer as qwen2_plain's SFT, initialised with another seed."""
    return build_model(tmp_path_factory.mktemp("indep") / "model", "qwen2", seed=1234, tokenizer_tag="sft")


def test_sibling_passes(trio, vector):
    t = trio("qwen2_plain")
    report = check(vector("qwen2_plain"), str(t.target))
    c = _by_name(report)
    assert report.ok
    assert c["architecture"].status == "pass" and c["architecture"].details["matched"] == len(
        VectorCard.read(vector("qwen2_plain")).tensors)
    assert c["config"].status == "pass"
    assert c["lineage"].status == "pass" and c["lineage"].details["correlation"] > 0.95
    # the target has its own special token (<|target|>) on the same vocabulary: a warning, not a failure
    assert c["tokenizer"].status == "warn"
    assert c["tokenizer"].details["added_only_in_target"] == ["<|target|>"]
    # against `from` itself the sketch matches exactly
    assert _by_name(check(vector("qwen2_plain"), str(t.sft)))["lineage"].details["correlation"] == 1.0


def test_independent_initialisation_fails_lineage(vector, independent):
    report = check(vector("qwen2_plain"), str(independent))
    c = _by_name(report)
    assert not report.ok and [f.name for f in report.failures()] == ["lineage"]
    assert c["architecture"].status == c["config"].status == c["tokenizer"].status == "pass"
    r = c["lineage"].details["correlation"]
    assert abs(r) < 0.1 < LINEAGE_FAIL + 0.1
    assert len(c["lineage"].details["per_tensor"]) == 4


def test_changed_rope_theta_fails_config(trio, vector, tmp_path):
    target = copy_folder(trio("qwen2_plain").target, tmp_path / "target")
    config = json.loads((target / "config.json").read_text())
    edit_json(target / "config.json", rope_parameters={**config["rope_parameters"], "rope_theta": 1000000.0})
    c = _by_name(check(vector("qwen2_plain"), str(target)))
    assert c["config"].status == "fail"
    assert c["config"].details["differ"] == {"rope.rope_theta": [10000.0, 1000000.0]}
    assert "rope.rope_theta 10000.0 vs 1000000.0" in c["config"].summary
    assert c["lineage"].status == "pass"  # equal shapes, same weights lineage: only the config tells


def test_config_normalises_old_and_new_rope_fields():
    old = {"rope_theta": 10000, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
    new = {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "rms_norm_eps": 1e-06,
           "hidden_act": "silu"}
    assert config_values(old) == config_values(new) == {
        "hidden_act": "silu", "norm_eps": 1e-6, "rope.rope_theta": 10000.0, "rope.rope_type": "default"}
    scaled = config_values({"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert scaled == {"rope.rope_theta": 1e6, "rope.rope_type": "yarn", "rope.factor": 4.0}


def test_other_tokenizer_fails_and_other_max_positions_warns(trio, vector, tmp_path, monkeypatch):
    target = copy_folder(trio("qwen2_plain").target, tmp_path / "target")
    import rvhub.toy as toy

    monkeypatch.setattr(toy, "_CORPUS", ["an entirely different corpus gives different merges"] * 4)
    save_tokenizer(target, "sft")
    edit_json(target / "config.json", max_position_embeddings=4096)
    report = check(vector("qwen2_plain"), str(target))
    c = _by_name(report)
    assert c["tokenizer"].status == "fail" and not c["tokenizer"].details["vocab_equal"]
    assert "token ids mean different things" in c["tokenizer"].summary
    assert c["config"].status == "warn" and c["config"].details["differ"] == {"max_position_embeddings": [256, 4096]}
    assert [f.name for f in report.failures()] == ["tokenizer"]


def test_check_a_hub_id_from_the_cache_offline(trio, vector):
    cache_hub_repo("rvhub-test/check-target", trio("qwen2_plain").target, "c" * 40)
    report = check(vector("qwen2_plain"), "rvhub-test/check-target")
    assert report.ok and report.target == "rvhub-test/check-target@" + "c" * 40


# ---------------------------------------------------------------- the CLI


def test_check_cli_exit_codes_and_json(trio, vector, independent):
    runner = CliRunner()
    ok = runner.invoke(app, ["check", str(vector("qwen2_plain")), "--base", str(trio("qwen2_plain").target)])
    assert ok.exit_code == 0, ok.output
    lines = ok.stdout.splitlines()
    assert lines[0].endswith(f"WARN for {vector('qwen2_plain')}")
    assert [line.split()[:2] for line in lines[1:]] == [
        ["pass", "architecture"], ["pass", "config"], ["warn", "tokenizer"], ["pass", "lineage"]]

    bad = runner.invoke(app, ["check", str(vector("qwen2_plain")), "--base", str(independent), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and report["status"] == "fail"
    lineage = next(c for c in report["checks"] if c["name"] == "lineage")
    assert lineage["status"] == "fail" and abs(lineage["details"]["correlation"]) < 0.1
    assert bad.stderr == ""


def test_apply_refuses_a_failing_target_unless_forced(vector, independent, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(IncompatibleError) as err:
        apply(vector("qwen2_plain"), str(independent), out, progress=False)
    assert [name for name, _ in err.value.failures] == ["lineage"]
    assert "--force" in str(err.value) and "correlation" in str(err.value)
    assert_no_output(out)

    result = CliRunner().invoke(app, ["apply", str(vector("qwen2_plain")), "--base", str(independent), "-o",
                                      str(out), "-q"])
    assert result.exit_code == 1 and "failed the compatibility check (lineage: correlation" in result.stderr
    assert_no_output(out)

    apply(vector("qwen2_plain"), str(independent), out, force=True, progress=False)
    assert set(load_tensors(out)) == set(load_tensors(independent))


def test_a_card_without_fingerprints_still_checks_shapes(trio, vector, tmp_path):
    vec = copy_folder(vector("qwen2_plain"), tmp_path / "vec")
    card = json.loads((vec / "rvhub.json").read_text())
    del card["fingerprints"]
    (vec / "rvhub.json").write_text(json.dumps(card))
    c = _by_name(check(vec, str(trio("qwen2_plain").target)))
    assert c["architecture"].status == "pass"
    assert {c[n].status for n in ("config", "tokenizer", "lineage")} == {"warn"}


def test_check_a_hub_id_reads_headers_and_a_few_ranges_only(trio, vector, tmp_path):
    """Over real HTTP with the real huggingface_hub client (in a subprocess: its endpoint is read at import)."""
    from helpers import cli_env, run_cli
    from hub_stub import HubStub

    t = trio("qwen2_wide")  # 2.9 MB of weights: a few ranges are a small fraction of them
    with HubStub("rvhub-test/remote-target", t.target, "d" * 40) as hub:
        env = cli_env(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"))
        env["HF_HUB_OFFLINE"] = "0"
        done = run_cli("check", vector("qwen2_wide"), "--base", "rvhub-test/remote-target", "--json", env=env)
        served = dict(hub.served)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["target"] == "rvhub-test/remote-target@" + "d" * 40
    lineage = next(c for c in report["checks"] if c["name"] == "lineage")
    assert lineage["status"] == "pass" and lineage["details"]["correlation"] > 0.95
    size = (t.target / "model.safetensors").stat().st_size
    assert served["model.safetensors"] < size / 10, f"{served['model.safetensors']} of {size} bytes read"
    assert served.get("config.json") and served.get("tokenizer.json")

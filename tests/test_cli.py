"""The ``rvhub`` command line: errors as one line, JSON and human output, progress bars, help, and what an
interrupted run leaves behind. Most calls run in-process (typer's CliRunner); the ones about the process
itself (signals, environment, tracebacks of a real interpreter) run ``rvhub`` as a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from bad_inputs import CASE_IDS, CASES, HUB_MISSING, cli_args
from helpers import (
    assert_bitwise_equal,
    assert_no_output,
    bits,
    cli_env,
    expected_apply,
    folder_snapshot,
    load_tensors,
    popen_cli,
    run_cli,
    save_tensors,
    tmp_siblings,
)
from typer.testing import CliRunner

from rvhub.apply import ApplyResult, apply
from rvhub.card import VectorCard
from rvhub.cli import app
from rvhub.extract import ExtractResult, extract


@pytest.fixture(autouse=True)
def _keep_signal_handlers(monkeypatch):
    """The CLI installs SIGINT/SIGTERM handlers; give pytest its own back after each in-process run."""
    monkeypatch.delenv("RVHUB_DEBUG", raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


def invoke(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    line = lines[0].split("\r")[-1]  # a cleared progress bar may precede it on the same line
    assert line.startswith("error: "), line
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_input_gives_one_error_line(bad, tmp_path, case):
    out = tmp_path / "out"
    result = invoke(*cli_args(case, bad, out))
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert_one_error_line(result.stderr, *case.says(bad))
    assert_no_output(out)
    assert not bad.canary.exists(), "a pickle was loaded"


def test_missing_hub_repo_in_a_real_process(bad, tmp_path):
    out = tmp_path / "out"
    done = run_cli("extract", "--from", HUB_MISSING, "--to", bad.rl, "-o", out)
    assert done.returncode == 1
    assert_one_error_line(done.stderr, HUB_MISSING, "not found")
    assert_no_output(out)


def test_pickle_only_model_is_never_unpickled(bad, tmp_path):
    out = tmp_path / "out"
    done = run_cli("apply", bad.vector, "--base", bad.pickle_only, "-o", out)
    assert done.returncode == 1
    assert_one_error_line(done.stderr, "pytorch_model.bin", "never unpickles")
    assert not bad.canary.exists()
    assert_no_output(out)


def test_failure_mid_run_clears_the_progress_bar(bad, tmp_path):
    """Not quiet: the bar has been drawn when the NaN is found; stderr still reads as one error line."""
    out = tmp_path / "out"
    done = run_cli("apply", bad.vector, "--base", bad.target_nan, "-o", out)
    assert done.returncode == 1
    assert_one_error_line(done.stderr, "model.layers.0.mlp.gate_proj.weight", "NaN")
    assert_no_output(out)


@pytest.mark.parametrize("how", ["--debug", "RVHUB_DEBUG=1"])
def test_debug_shows_the_traceback(bad, tmp_path, how):
    args = ["apply", bad.vector, "--base", bad.target_shape, "-o", tmp_path / "out", "--quiet"]
    result = invoke(*args, "--debug") if how == "--debug" else invoke(*args, env={"RVHUB_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ShapeMismatchError" in result.stderr
    assert result.stderr.rstrip().split("\n")[-1].startswith("error: shape mismatch")


def test_existing_output_is_refused_then_overwritten(bad, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = folder_snapshot(out)

    refused = invoke("apply", bad.vector, "--base", bad.target, "-o", out, "--quiet")
    assert refused.exit_code == 1
    assert_one_error_line(refused.stderr, str(out), "--overwrite")
    assert folder_snapshot(out) == before

    replaced = invoke("apply", bad.vector, "--base", bad.target, "-o", out, "--quiet", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "keep.txt").exists()
    expected = expected_apply(load_tensors(bad.target), load_tensors(bad.sft), load_tensors(bad.rl), 1.0)
    assert_bitwise_equal(load_tensors(out), expected)


# ---------------------------------------------------------------- options and output


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_extract_json_summary(trio, tmp_path):
    t = trio("qwen2_hard")
    vec = tmp_path / "vec"
    result = invoke("extract", "--from", t.sft, "--to", t.rl, "-o", vec, "--json", "--quiet",
                    "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    card = VectorCard.read(vec)

    assert set(summary) == _fields(ExtractResult)
    assert summary["out"] == str(vec) and summary["format"] == "sparse" and summary["exact"] is True
    assert summary["tensors"] == len(card.tensors) and summary["unchanged_tensors"] == len(card.unchanged)
    assert summary["changed_elements"] == sum(e.changed for e in card.tensors)
    assert summary["fixups"] == sum(e.fixups for e in card.tensors) > 0
    assert summary["elements"] == sum(v.numel() for v in load_tensors(t.rl).values())
    assert summary["vector_bytes"] == sum(f.size for f in card.files)
    assert summary["model_bytes"] == sum(v.numel() * 2 for v in load_tensors(t.rl).values())
    assert len(card.files) > 2, "--max-shard-size 20KB should give several shards"


def test_apply_json_summary(trio, vector, tmp_path):
    t = trio("qwen2_plain")
    vec = vector("qwen2_plain")
    out = tmp_path / "out"
    result = invoke("apply", vec, "--base", t.target, "-o", out, "--scale", "-1", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    card = VectorCard.read(vec)

    assert set(summary) == _fields(ApplyResult)
    assert summary["out"] == str(out) and summary["scale"] == -1.0 and summary["device"] == "cpu"
    assert summary["tensors_changed"] == len(card.tensors)
    assert summary["tensors_copied"] == len(card.unchanged)
    assert summary["output_bytes"] == (out / "model.safetensors").stat().st_size
    assert summary["skipped_vocab_rows"] == {}
    expected = expected_apply(load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl), -1.0)
    assert_bitwise_equal(load_tensors(out), expected, "--scale -1")


def test_human_summaries_are_one_line(trio, tmp_path):
    t = trio("qwen2_plain")
    extracted = invoke("extract", "--from", t.sft, "--to", t.rl, "-o", tmp_path / "v", "--quiet")
    applied = invoke("apply", tmp_path / "v", "--base", t.target, "-o", tmp_path / "out", "--quiet")
    for result in (extracted, applied):
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        assert result.stdout.startswith("wrote ") and result.stdout.count("\n") == 1
    assert "exact" in extracted.stdout and "α=1" in applied.stdout


def test_dense_format_and_float32_output(trio, tmp_path):
    t = trio("qwen2_plain")
    vec, out = tmp_path / "v", tmp_path / "out"
    assert invoke("extract", "--from", t.sft, "--to", t.rl, "-o", vec, "--format", "dense", "-q").exit_code == 0
    assert VectorCard.read(vec).format == "dense" and VectorCard.read(vec).values_dtype == "F32"

    assert invoke("apply", vec, "--base", t.target, "-o", out, "--dtype", "float32", "-q").exit_code == 0
    expected = expected_apply(
        load_tensors(t.target), load_tensors(t.sft), load_tensors(t.rl), 1.0, out_dtype=torch.float32
    )
    assert_bitwise_equal(load_tensors(out), expected, "--dtype float32")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_allow_vocab_mismatch_reports_skipped_rows(bad, tmp_path):
    out = tmp_path / "out"
    # target_vocab is initialised independently: --force past the lineage check
    result = invoke("apply", bad.vector, "--base", bad.target_vocab, "-o", out, "--allow-vocab-mismatch", "-q",
                    "--json", "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped_vocab_rows"] == {"model.embed_tokens.weight": 32}
    target = load_tensors(bad.target_vocab)["model.embed_tokens.weight"]
    assert torch.equal(bits(load_tensors(out)["model.embed_tokens.weight"][128:]), bits(target[128:]))


# ---------------------------------------------------------------- progress bars


@pytest.mark.parametrize("mode", ["default", "--quiet", "HF_HUB_DISABLE_PROGRESS_BARS=1"])
def test_progress_bar(trio, vector, tmp_path, mode):
    t = trio("qwen2_plain")
    args = ["apply", vector("qwen2_plain"), "--base", t.target, "-o", tmp_path / "out"]
    env = cli_env(HF_HUB_DISABLE_PROGRESS_BARS="1") if mode.startswith("HF_") else cli_env()
    done = run_cli(*args, *(["--quiet"] if mode == "--quiet" else []), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote ")
    if mode == "default":
        assert "B/s" in done.stderr or "it/s" in done.stderr, done.stderr
    else:
        assert done.stderr == ""


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command,options", [
    ("extract", ["--from", "--to", "--out", "-o", "--format", "--dtype", "--max-shard-size", "--overwrite",
                 "--quiet", "--json", "--debug"]),
    ("apply", ["VECTOR", "--base", "--out", "-o", "--scale", "--dtype", "--device", "--allow-vocab-mismatch",
               "--max-shard-size", "--overwrite", "--quiet", "--json", "--debug"]),
])
def test_help_mentions_every_option(command, options):
    result = invoke(command, "--help", env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0
    text = result.stdout
    for option in options:
        assert option in text or option.lower() in text, f"{option} missing from `rvhub {command} --help`"
    if command == "extract":
        assert "org/name[@rev]" in text  # rich markup must not swallow "[@rev]"


# ---------------------------------------------------------------- interrupted runs


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 64 MB bf16 model pair (four 2048×4096 matrices, every 5th element moved) and its sparse vector:
    enough that `rvhub apply` writes for a good fraction of a second."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    sft = {f"layers.{i}.weight": (0.02 * torch.randn(2048, 4096, generator=g)).to(torch.bfloat16) for i in range(4)}
    rl = {}
    for name, t in sft.items():
        moved = bits(t).clone()
        moved.view(-1)[::5] += 1
        rl[name] = moved.view(torch.bfloat16)
    save_tensors(root / "sft" / "model.safetensors", sft)
    save_tensors(root / "rl" / "model.safetensors", rl)
    extract(str(root / "sft"), str(root / "rl"), root / "vec", progress=False)
    return root


def _wait_until_writing(proc, out: Path, timeout: float = 60.0) -> None:
    """Poll until the run's hidden temporary folder holds a file with data in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in tmp_siblings(out):
            if any(f.stat().st_size for f in (out.parent / name).iterdir() if f.is_file()):
                return
        if proc.poll() is not None:
            pytest.fail(f"apply ended (exit {proc.returncode}) before it was seen writing: {proc.stderr.read()}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("apply did not start writing in time")


@pytest.mark.slow
def test_killed_run_leaves_no_output_and_the_next_run_cleans_up(big, tmp_path):
    out = tmp_path / "out"
    proc = popen_cli("apply", big / "vec", "--base", big / "sft", "-o", out, "--quiet")
    _wait_until_writing(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    assert not out.exists()
    stale = tmp_siblings(out)
    assert stale, "a kill -9 leaves its hidden temporary folder"

    apply(big / "vec", str(big / "sft"), out, progress=False)

    assert not tmp_siblings(out), f"stale temporary folders were not removed: {stale}"
    assert_bitwise_equal(load_tensors(out), load_tensors(big / "rl"), "the run after the kill")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_terminated_run_removes_its_temporary_folder(big, tmp_path, sig):
    out = tmp_path / "out"
    proc = popen_cli("apply", big / "vec", "--base", big / "sft", "-o", out, "--quiet")
    _wait_until_writing(proc, out)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip() == "interrupted; nothing was written"
    assert_no_output(out)

"""Commands that do no arithmetic never import torch (nor transformers, peft, numpy): each runs in a fresh
interpreter, and the modules loaded at its end are listed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_env, run_cli

from rvhub import __version__
from rvhub.registry import push

HEAVY = ("torch", "transformers", "peft", "numpy", "safetensors", "lm_eval")
_RUNNER = """
import json, sys
from rvhub.cli import app
try:
    app(sys.argv[2:])
except SystemExit as e:
    code = e.code or 0
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}, f)
""".replace("HEAVY", repr(HEAVY))


@pytest.fixture(scope="module")
def registry(vector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("light-registry")
    push(vector("qwen2_plain"), "rvhub-test/light", registry=root, progress=False)
    return root


@pytest.mark.parametrize("command", ["--help", "--version", "version", "info", "search", "card"])
def test_command_does_not_import_torch(command, registry, vector, tmp_path):
    args = {
        "info": ["info", "rvhub-test/light", "--registry", registry],
        "search": ["search", "--registry", registry],
        "card": ["card", vector("qwen2_plain")],
    }.get(command, [command])
    report = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(report), *map(str, args)], capture_output=True,
                          text=True, env=cli_env(), timeout=120)
    result = json.loads(report.read_text())
    assert result["code"] == 0, done.stderr
    assert result["heavy"] == [], f"rvhub {command} imported {result['heavy']}"
    if command in ("--version", "version"):
        assert done.stdout.strip() == __version__
    if command == "info":
        assert "rvhub-test/light" in done.stdout


def test_check_against_a_local_base_names_it_without_a_missing_hash(trio, vector):
    t = trio("qwen2_plain")
    done = run_cli("check", vector("qwen2_plain"), "--base", t.target)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert "None" not in first and str(t.target) in first, first

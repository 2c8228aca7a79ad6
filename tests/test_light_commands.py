"""Commands that do no arithmetic never import torch (nor transformers, peft, numpy): each runs in a fresh
interpreter, and the modules loaded at its end are listed."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli, run_cli_imports

from rvhub import __version__
from rvhub.registry import push

HEAVY = ("torch", "transformers", "peft", "numpy", "safetensors", "lm_eval")


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
    heavy, done = run_cli_imports(tmp_path / "modules.json", HEAVY, *args, timeout=120)
    assert heavy == [], f"rvhub {command} imported {heavy}"
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

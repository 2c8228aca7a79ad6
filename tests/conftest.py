"""Session fixtures: tiny seeded SFT/RL/TARGET trios (rvhub.toy) and vectors extracted from them.

Tests never touch the network: the Hub is switched off before huggingface_hub is imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# a private, empty Hub cache: nothing the user has cached can answer for a test's repo id
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="rvhub-tests-hf-cache-")
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no fork warning from tokenizers in CLI subprocesses

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bad_inputs import BadInputs, build_bad_inputs
from hub_server import LocalHub

from rvhub.extract import extract
from rvhub.toy import Trio, build_lowrank_trio, build_trio

atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], True)

TRIOS: dict[str, dict[str, Any]] = {
    # adversarial: hard elements per matrix that need the formats' float32 fix-ups to stay exact
    "qwen2_hard": dict(arch="qwen2", adversarial=4, seed=0),
    "llama_hard": dict(arch="llama", adversarial=4, seed=10),
    # no hard elements: θ_T + α·v has a plain float32 reference to compare against
    "qwen2_plain": dict(arch="qwen2", seed=20),
    "llama_plain": dict(arch="llama", seed=30),
    # large updates: 20% of the elements moved by N(0, 5% of the tensor's rms); small ones change sign
    "qwen2_large": dict(arch="qwen2", seed=80, relative=0.05),
    "llama_large": dict(arch="llama", seed=90, relative=0.05),
    # big enough (2.9 MB) that safetensors headers do not count in size ratios
    "qwen2_wide": dict(arch="qwen2", seed=40, hidden=256, vocab=1024),
}


def _label_configs(trio: Trio) -> None:
    """Give each config.json a role entry, so a test can tell whose config an output carries."""
    for role in ("sft", "rl", "target"):
        path = getattr(trio, role) / "config.json"
        config = json.loads(path.read_text())
        config["rvhub_test_role"] = role
        path.write_text(json.dumps(config, indent=2) + "\n")


@pytest.fixture(scope="session")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Trio]:
    """``trio(name)``: one of TRIOS, built once per session."""
    built: dict[str, Trio] = {}

    def get(name: str) -> Trio:
        if name not in built:
            built[name] = build_trio(tmp_path_factory.mktemp(name), **TRIOS[name])
            _label_configs(built[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def vector(tmp_path_factory: pytest.TempPathFactory, trio: Callable[[str], Trio]) -> Callable[..., Path]:
    """``vector(trio_name, format="sparse", **extract_options)``: v = RL − SFT, extracted once per session."""
    built: dict[tuple[Any, ...], Path] = {}

    def get(name: str, format: str = "sparse", **options: Any) -> Path:
        key = (name, format, *sorted(options.items()))
        if key not in built:
            t = trio(name)
            out = tmp_path_factory.mktemp(f"vec-{name}-{format}") / "vector"
            extract(str(t.sft), str(t.rl), out, format=format, progress=False, **options)  # type: ignore[arg-type]
            built[key] = out
        return built[key]

    return get


@pytest.fixture(scope="session")
def bad(
    tmp_path_factory: pytest.TempPathFactory, trio: Callable[[str], Trio], vector: Callable[..., Path]
) -> BadInputs:
    """Broken and mismatched inputs, all derived from the plain qwen2 trio and its sparse vector."""
    sharded = vector("qwen2_plain", max_shard_size="20KB")
    return build_bad_inputs(tmp_path_factory.mktemp("bad"), trio("qwen2_plain"), vector("qwen2_plain"), sharded)


LOWRANK_RANK = 3
LOWRANK: dict[str, dict[str, Any]] = {
    "qwen2": dict(arch="qwen2", seed=50),  # tied; deltas on every linear weight
    "llama": dict(arch="llama", seed=60),  # untied; linear weights only
    "llama_emb": dict(arch="llama", seed=70, embeddings=True),  # untied; embed_tokens and lm_head move too
}


@pytest.fixture(scope="session")
def lowrank(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Trio, Path]]:
    """``lowrank(name, format="sparse")``: a float32 trio with exact rank-3 deltas, and its vector."""
    built: dict[tuple[str, str], tuple[Trio, Path]] = {}

    def get(name: str, format: str = "sparse") -> tuple[Trio, Path]:
        if (name, format) not in built:
            root = tmp_path_factory.mktemp(f"lowrank-{name}-{format}")
            trio = build_lowrank_trio(root / "trio", rank=LOWRANK_RANK, **LOWRANK[name])
            extract(str(trio.sft), str(trio.rl), root / "vec", format=format, progress=False)  # type: ignore[arg-type]
            built[name, format] = (trio, root / "vec")
        return built[name, format]

    return get


# ------------------------------------------------------------------ the local Hub

HUB_TOKEN = "hf_rvhubTESTtoken0123456789abcdefXYZ"  # recognisable: no output may ever contain it


@pytest.fixture(scope="session")
def hub() -> Iterator[LocalHub]:
    """A Hub-compatible server on 127.0.0.1 (tests/hub_server.py) that accepts HUB_TOKEN only."""
    server = LocalHub.start(HUB_TOKEN)
    yield server
    server.close()


@pytest.fixture
def hub_env(hub: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Point huggingface_hub at the local Hub, online, for this test; return the environment a CLI subprocess
    needs for the same.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at import, into
    ``huggingface_hub.constants``, and every call reads them from there: so in this process the constants are
    patched (undone after the test; the session stays offline otherwise), and a subprocess gets them as
    environment variables. The token comes from HF_TOKEN; HF_HOME is empty so that no `hf auth login`
    token of the developer's can take part.
    """
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.delenv("RVHUB_REGISTRY", raising=False)
    hub.faults.clear()
    hub.sent.clear(), hub.received.clear()
    hub.hostile = None
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "RVHUB_DEBUG")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_TOKEN=HUB_TOKEN,
               HF_HOME=str(home), TOKENIZERS_PARALLELISM="false")
    return env

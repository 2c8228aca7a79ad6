"""No leaked local paths (issue 15, part 4): push publishes a local model's folder name and content hash only,
in rvhub.json and README.md as they land in the registry, unless --keep-local-paths; the vector folder keeps
the full paths, and the published card is verified on pull like any other."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from hub_server import LocalHub
from typer.testing import CliRunner

from rvhub._public import is_local_path, public_card
from rvhub.card import BenchmarkDelta, Scores, VectorCard
from rvhub.cli import app
from rvhub.registry import info, pull, push

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def _published(hub, registry: Path | None, repo: str) -> dict[str, str]:
    """rvhub.json and README.md as the registry holds them."""
    if registry is None:
        files = hub.repos[repo].commits[hub.repos[repo].branches["main"]].files
        return {n: bytes(files[n].data).decode() for n in ("rvhub.json", "README.md")}
    commit = (registry / repo / "refs" / "main").read_text().strip()
    return {n: (registry / repo / "snapshots" / commit / n).read_text() for n in ("rvhub.json", "README.md")}


@pytest.fixture
def hub(monkeypatch) -> Iterator[LocalHub]:
    """A server of this test's own (the session's keeps no LFS object a later test expects to upload)."""
    from huggingface_hub import constants

    server = LocalHub.start(HUB_TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.delenv("RVHUB_REGISTRY", raising=False)
    yield server
    server.close()


@pytest.fixture(params=["hub", "local"])
def where(request, hub, tmp_path):
    return None if request.param == "hub" else tmp_path / "registry"


def test_push_publishes_folder_names_and_content_hashes_only(request, hub, where, vector, trio, tmp_path):
    t = trio("qwen2_plain")
    vec = tmp_path / "vec"
    shutil.copytree(vector("qwen2_plain"), vec)
    card = VectorCard.read(vec)
    card = card.model_copy(update={"benchmarks": [BenchmarkDelta(
        benchmark="gsm8k", metric="acc", target=str(t.target), scores=Scores(target=0.5, plus=0.6))]})
    card.write(vec)
    before = (vec / "rvhub.json").read_text()
    assert str(t.sft) in before and str(t.target) in before
    repo = "paths/" + request.node.name.split("[")[1].rstrip("]")

    result = push(vec, repo, registry=where, progress=False)
    assert result.scrubbed == ["source_from", "source_to", "benchmarks.0.target"]
    published = _published(hub, where, repo)
    for text in published.values():
        for path in (t.sft, t.rl, t.target):
            assert str(path) not in text and str(path.parent) not in text
    card_out = VectorCard.from_json(published["rvhub.json"], "pushed")
    assert (card_out.source_from.id, card_out.source_to.id, card_out.benchmarks[0].target) == ("sft", "rl", "target")
    assert card_out.source_from.content_sha256 == card.source_from.content_sha256  # what pins a local model
    assert card_out.source_to.content_sha256[:16] in published["README.md"]
    assert VectorCard.from_readme(published["README.md"]) == card_out
    assert card_out.model_copy(update={"source_from": card.source_from, "source_to": card.source_to,
                                       "benchmarks": card.benchmarks}) == card  # nothing else changed
    assert (vec / "rvhub.json").read_text() == before  # the local copy keeps the full paths
    pulled = pull(repo, registry=where, out=tmp_path / "pulled", progress=False)  # verified against its card
    assert VectorCard.read(Path(pulled.path)) == card_out and info(repo, registry=where).card == card_out

    kept = push(vec, repo, registry=where, progress=False, keep_local_paths=True)
    assert kept.committed and kept.scrubbed == []
    published = _published(hub, where, repo)
    assert str(t.sft) in published["rvhub.json"] and VectorCard.from_json(published["rvhub.json"], "x") == card


def test_cli_says_what_it_scrubbed_and_keeps_paths_when_asked(vector, trio, tmp_path):
    reg = tmp_path / "reg"
    said = CliRunner().invoke(app, ["push", str(vector("qwen2_plain")), "cli/vec", "--registry", str(reg), "--quiet"])
    assert said.exit_code == 0, said.output
    assert "local paths published as folder name + content hash only (source_from, source_to)" in said.stdout
    assert "--keep-local-paths keeps them" in said.stdout
    kept = CliRunner().invoke(app, ["push", str(vector("qwen2_plain")), "cli/vec", "--registry", str(reg),
                                    "--keep-local-paths", "--json"])
    assert kept.exit_code == 0 and json.loads(kept.stdout)["scrubbed"] == []
    assert str(trio("qwen2_plain").sft) in info("cli/vec", registry=reg).card.source_from.id


@pytest.mark.parametrize("text, local, published", [
    ("Qwen/Qwen2.5-1.5B", False, "Qwen/Qwen2.5-1.5B"), ("org/vec@0123abc", False, "org/vec@0123abc"),
    ("org/vec@refs/pr/1", False, "org/vec@refs/pr/1"), ("/home/alice/models/sft", True, "sft"),
    ("./sft/", True, "sft"), ("~/x/rl", True, "rl"), ("C:\\Users\\bob\\target", True, "target"),
    ("a/b/c", True, "c"), ("/", True, "local-folder"), ("sft", False, "sft"),
])
def test_what_counts_as_a_local_path(vector, text, local, published):
    assert is_local_path(text) is local
    card = VectorCard.read(vector("qwen2_plain"))
    card = card.model_copy(update={"benchmarks": [BenchmarkDelta(
        benchmark="b", metric="m", target=text, scores=Scores(target=0.0, plus=1.0))]})
    assert public_card(card)[0].benchmarks[0].target == published

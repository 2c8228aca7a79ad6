"""``rvhub mirror``: Hub → folder, folder → Hub and folder → folder, each twice (the second run makes no
commit), keeping the card and the commit message; a tampered source is refused and DST left as it was. The Hub
is the local server (tests/hub_server.py) through the real huggingface_hub client."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from hostile_hub import Hostile
from typer.testing import CliRunner

from rvhub._local_registry import LocalRegistry
from rvhub._public import public_card
from rvhub.card import CARD_FILE, README_FILE, VectorCard
from rvhub.cli import app
from rvhub.errors import HostileServerError, IntegrityError, InvalidOptionError, RegistryUnavailableError
from rvhub.mirror import mirror, parse_location
from rvhub.registry import info, pull, push

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

VECTOR_FILE = "vector.safetensors"


def repo_name(request, suffix: str = "") -> str:
    return "rvtest/" + re.sub(r"[^\w]+", "_", request.node.name)[:70].strip("_") + suffix


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links followed) with its bytes: DST's whole state."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_vector(pulled_path: str, vec: Path) -> None:
    """The mirrored copy holds the vector's files and the card as push published it (local paths cut)."""
    card = VectorCard.read(vec)
    for e in card.files:
        assert (Path(pulled_path) / e.path).read_bytes() == (vec / e.path).read_bytes()
    published, _ = public_card(card)
    assert (Path(pulled_path) / CARD_FILE).read_bytes() == published.to_json().encode()


def test_hub_to_folder_twice(request, hub, hub_env, vector, tmp_path):
    vec = vector("qwen2_plain")
    repo = repo_name(request)
    pushed = push(vec, repo, message="a vector for the air-gapped site", progress=False)
    folder = tmp_path / "registry"
    first = mirror(repo, f"{folder}::{repo}", progress=False)
    assert first.committed and first.source_commit == pushed.commit
    assert first.message == "a vector for the air-gapped site"
    local = LocalRegistry(folder)
    assert local.commit_message(repo, first.commit) == "a vector for the air-gapped site"
    same_vector(pull(repo, registry=folder, progress=False).path, vec)
    readme = (folder / repo / "snapshots" / first.commit / README_FILE).read_text()
    assert readme == public_card(VectorCard.read(vec))[0].to_readme(repo_id=repo)
    state = tree(folder)
    hub.sent.clear()

    second = mirror(repo, f"{folder}::{repo}", progress=False)
    assert not second.committed and second.commit == first.commit
    assert tree(folder) == state and sum(hub.sent.values()) == 0  # nothing changed, nothing downloaded again


def test_folder_to_hub_twice_keeps_title_and_description(request, hub, hub_env, vector, tmp_path):
    vec = vector("qwen2_hard")
    repo = repo_name(request)
    folder = tmp_path / "registry"
    pushed = push(vec, repo, registry=folder, message="v2 of the vector\n\nfrom run 7, α = 1", progress=False)
    first = mirror(f"{folder}::{repo}@{pushed.commit}", f"hub::{repo}", progress=False)
    assert first.committed and hub.history(repo)[0] == first.commit and len(hub.history(repo)) == 2
    assert hub.repos[repo].commits[first.commit].message == "v2 of the vector\n\nfrom run 7, α = 1"
    assert info(repo).card == public_card(VectorCard.read(vec))[0]
    same_vector(pull(repo, progress=False).path, vec)
    history = hub.history(repo)

    second = mirror(f"{folder}::{repo}", f"hub::{repo}", progress=False)
    assert not second.committed and hub.history(repo) == history

    back = mirror(f"hub::{repo}", f"{tmp_path / 'other'}::{repo}", progress=False)  # and back: the same message
    message = LocalRegistry(tmp_path / "other").commit_message(repo, back.commit)
    assert message == "v2 of the vector\n\nfrom run 7, α = 1"


def test_folder_to_folder_twice_to_a_branch_and_another_name(request, vector, tmp_path, monkeypatch):
    monkeypatch.delenv("RVHUB_REGISTRY", raising=False)
    vec = vector("qwen2_plain")
    repo = repo_name(request)
    a, b = tmp_path / "a", tmp_path / "b"
    push(vec, repo, registry=a, message="first", progress=False)
    first = mirror(f"{a}::{repo}", f"{b}::mirrors/copy@dev", progress=False)
    assert first.committed and first.branch == "dev" and first.repo_id == "mirrors/copy"
    got = pull("mirrors/copy@dev", registry=b, progress=False)
    same_vector(got.path, vec)
    assert "mirrors/copy" in (Path(got.path) / README_FILE).read_text()  # its how-to names DST's repo
    state = tree(b)
    second = mirror(f"{a}::{repo}", f"{b}::mirrors/copy@dev", progress=False)
    assert not second.committed and tree(b) == state


def test_a_tampered_hub_source_is_refused_and_dst_left_as_it_was(request, hub, hub_env, vector, tmp_path):
    repo = repo_name(request)
    folder = tmp_path / "registry"
    push(vector("qwen2_plain"), repo, progress=False)
    mirror(repo, f"{folder}::{repo}", progress=False)  # DST holds the first version
    state = tree(folder)
    push(vector("qwen2_hard"), repo, progress=False)
    hub.tamper(repo, VECTOR_FILE)
    with pytest.raises(IntegrityError, match=r"vector\.safetensors of .* does not match the size and sha256"):
        mirror(repo, f"{folder}::{repo}", progress=False)
    assert tree(folder) == state


def test_a_tampered_folder_source_is_refused_and_the_hub_left_as_it_was(request, hub, hub_env, vector, tmp_path):
    repo = repo_name(request)
    folder = tmp_path / "registry"
    push(vector("qwen2_plain"), repo, registry=folder, progress=False)
    snapshot = next((folder / repo / "snapshots").iterdir())
    data = bytearray((snapshot / VECTOR_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (snapshot / VECTOR_FILE).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"vector\.safetensors"):
        mirror(f"{folder}::{repo}", f"hub::{repo}", progress=False)
    assert hub.history(repo) == []  # not even created


def test_cli_mirror_says_when_nothing_changed(request, hub, hub_env, vector, tmp_path):
    repo = repo_name(request)
    push(vector("qwen2_plain"), repo, progress=False)
    dst = f"{tmp_path / 'registry'}::{repo}"
    runner = CliRunner()
    first = runner.invoke(app, ["mirror", repo, dst, "--quiet"])
    assert first.exit_code == 0, first.stderr
    assert first.stdout.startswith(f"mirrored {repo} @ ") and "sha256 verified" in first.stdout
    second = runner.invoke(app, ["mirror", repo, dst, "--json"])
    assert second.exit_code == 0 and json.loads(second.stdout)["committed"] is False
    third = runner.invoke(app, ["mirror", repo, dst])
    assert "no change" in third.stdout
    bad = runner.invoke(app, ["mirror", f"::{repo}", dst])
    assert bad.exit_code == 1 and "give a registry before '::'" in bad.stderr
    assert HUB_TOKEN not in first.output + second.output + third.output


def test_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("RVHUB_REGISTRY", str(tmp_path / "default"))
    reg, ref = parse_location("org/name@dev")
    assert isinstance(reg, LocalRegistry) and reg.root == tmp_path / "default" and ref.revision == "dev"
    reg, ref = parse_location("hub::org/name")
    assert reg.description.startswith("the Hub at ") and ref.repo_id == "org/name"
    reg, _ = parse_location(f"{tmp_path}/x::org/name")
    assert isinstance(reg, LocalRegistry) and reg.root == tmp_path / "x"
    for bad in ("::org/name", "hub::not a repo", "hub::org/name@.."):
        with pytest.raises(InvalidOptionError):
            parse_location(bad)


@pytest.mark.parametrize("lie", ["500", "not json", "another commit"])
def test_a_commit_list_the_server_will_not_give_leaves_dst_as_it_was(request, hub, hub_env, vector, tmp_path, lie):
    repo = repo_name(request)
    push(vector("qwen2_plain"), repo, progress=False)
    hub.hostile = {"500": Hostile(fail={"commits": (500, {})}), "not json": Hostile(bad_json={"commits"}),
                   "another commit": Hostile()}[lie]
    if lie == "another commit":  # the list of the parent commit: not the one asked for
        hub.hostile.handle = lambda h, method, step, parts: (  # type: ignore[method-assign]
            h._commits(repo, hub.history(repo)[1]) if step == "commits" else None)
    error = RegistryUnavailableError if lie == "500" else HostileServerError
    with pytest.raises(error):
        mirror(repo, f"{tmp_path / 'registry'}::{repo}", progress=False)
    assert not (tmp_path / "registry").exists()

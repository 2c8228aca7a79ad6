"""Search at Hub scale (issue 15, part 1): ``search --base`` asks for the target's shape tag in one paged
listing and reads only the matches' cards, on the local Hub server holding 100 and 500 vectors of 5 shapes
(tests/search_world.py writes them straight into the server; a few go through the real ``rvhub push``), and
on a registry folder through its index. Requests are counted in the server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from hub_server import LocalHub
from huggingface_hub import constants
from search_world import Kind, fill, put_repo, with_shape
from typer.testing import CliRunner

from rvhub.card import VectorCard
from rvhub.cli import app
from rvhub.compat import open_target, shape_hash
from rvhub.errors import InvalidOptionError
from rvhub.registry import push, search

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

MATCHES = 20  # vectors of the target's shape, in every world
OTHER = ["a" * 16, "b" * 16, "c" * 16]  # three synthetic shapes, beside llama's


def _point(mp: pytest.MonkeyPatch, hub: LocalHub) -> None:
    """huggingface_hub at ``hub``, online, with the test token (as conftest's hub_env does)."""
    mp.setattr(constants, "ENDPOINT", hub.url)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.setenv("HF_TOKEN", HUB_TOKEN)
    mp.delenv("RVHUB_REGISTRY", raising=False)


class World:
    def __init__(self, hub: LocalHub, made: dict[str, list[str]], pushed: list[str]):
        self.hub, self.made, self.pushed = hub, made, pushed

    @property
    def matching(self) -> list[str]:
        return sorted(self.made["fit"] + self.pushed)

    def requests(self) -> int:
        return len(self.hub.log)


def _world(n: int, vector, tmp_path_factory) -> Iterator[World]:
    hub = LocalHub.start(HUB_TOKEN)
    qwen, llama = vector("qwen2_plain"), vector("llama_plain")
    qcard, lcard = VectorCard.read(qwen), VectorCard.read(llama)
    pushed_count = 2
    others = n - MATCHES
    each = others // 4
    kinds = [Kind("fit", qwen, qcard, MATCHES - pushed_count), Kind("llama", llama, lcard, others - 3 * each)]
    kinds += [Kind(f"shape{i}", llama, with_shape(lcard, h), each) for i, h in enumerate(OTHER)]
    org = f"many{n}"  # repo ids of their own: the Hugging Face cache must not answer for another world's
    made = fill(hub, kinds, org=org)
    pushed = [f"{org}/pushed-{i}" for i in range(pushed_count)]
    with pytest.MonkeyPatch.context() as mp:
        _point(mp, hub)
        for repo in pushed:  # through the real client and push, as a user would
            push(qwen, repo, progress=False)
    assert len(hub.repos) == n
    yield World(hub, made, pushed)
    hub.close()


@pytest.fixture(scope="module")
def world500(vector, tmp_path_factory) -> Iterator[World]:
    yield from _world(500, vector, tmp_path_factory)


@pytest.fixture(scope="module")
def world100(vector, tmp_path_factory) -> Iterator[World]:
    yield from _world(100, vector, tmp_path_factory)


@pytest.fixture
def own_hub(monkeypatch) -> Iterator[LocalHub]:
    """A server of this test's own (the session's keeps no LFS object a later test expects to upload)."""
    hub = LocalHub.start(HUB_TOKEN)
    _point(monkeypatch, hub)
    yield hub
    hub.close()


@pytest.fixture
def on(monkeypatch):
    """``on(world)``: point huggingface_hub at that world's server for this test."""
    def point(world: World) -> World:
        _point(monkeypatch, world.hub)
        world.hub.page_size = 1000
        return world

    return point


def _search(world: World, target: str, **options) -> tuple[list[str], int, int]:
    """Hits (repo ids), requests made and listing pages asked for."""
    before, pages = world.requests(), world.hub.requests("GET", "/api/models")
    found = search(base=target, limit=1000, **options)
    return [h.repo_id for h in found.hits], world.requests() - before, world.hub.requests("GET", "/api/models") - pages


def test_search_base_reads_only_the_matches_whatever_the_number_of_vectors(world100, world500, on, trio):
    target = str(trio("qwen2_plain").target)
    small = on(world100)
    hits100, requests100, pages100 = _search(small, target)
    assert sorted(hits100) == small.matching
    big = on(world500)
    hits500, requests500, pages500 = _search(big, target)
    assert sorted(hits500) == big.matching  # exactly the vectors of the target's shape, all of which fit
    assert pages100 == pages500 == 1
    assert requests100 == requests500 == 1 + MATCHES  # one listing page, one GET of each match's card at its commit
    cards = [p for m, p, _ in big.hub.log[-requests500:] if m == "GET" and p.endswith("/rvhub.json")]
    assert sorted(p.split("/")[2] for p in cards) == sorted(r.split("/")[1] for r in big.matching)


def test_paging_follows_the_link_header(world500, on, trio):
    world = on(world500)
    target = str(trio("qwen2_plain").target)
    whole, _, _ = _search(world, target, sort="downloads")
    world.hub.page_size = 7
    paged, _, pages = _search(world, target, sort="downloads")
    assert paged == whole and pages == -(-MATCHES // 7)  # 3 pages of at most 7


def test_a_listing_of_endless_pages_is_refused(world500, on, trio, monkeypatch):
    import rvhub._hub_registry as hub_registry
    from rvhub.errors import HostileServerError

    world = on(world500)
    monkeypatch.setattr(hub_registry, "MAX_LIST_PAGES", 2)
    world.hub.page_size = 7  # 20 matches: 3 pages, one more than allowed here
    with pytest.raises(HostileServerError, match="sent more than 2 pages of one model list"):
        search(base=str(trio("qwen2_plain").target))
    world.hub.page_size = 10
    assert len(search(base=str(trio("qwen2_plain").target)).hits) == MATCHES  # 2 pages: fine


@pytest.mark.parametrize("sort, key", [("downloads", "downloads"), ("likes", "likes"),
                                       ("last_modified", "lastModified")])
def test_sorting_and_limit(world500, on, trio, sort, key):
    world = on(world500)
    target = str(trio("qwen2_plain").target)
    repos = world.hub.repos

    def value(repo_id):
        r = repos[repo_id]
        return {"downloads": r.downloads, "likes": r.likes, "lastModified": r.commits[r.branches["main"]].date}[key]

    hits, _, _ = _search(world, target, sort=sort)
    assert hits == sorted(world.matching, key=value, reverse=True)
    before = world.requests()
    top = search(base=target, sort=sort, limit=3)
    assert [h.repo_id for h in top.hits] == hits[:3]
    assert world.requests() - before <= 1 + 3  # the listing stops at the limit: 3 cards read, one GET each
    if sort == "downloads":
        assert [h.listed.downloads for h in top.hits] == sorted((value(r) for r in hits[:3]), reverse=True)


def test_untagged_vectors_are_read_card_by_card_only_when_asked(request, own_hub, vector, trio):
    """Vectors pushed before the tags (cards without shape_hash) are not in the fast listing; with
    --include-untagged they are read one by one, and tagged ones of another shape are skipped unread."""
    q, ll = vector("qwen2_plain"), vector("llama_plain")
    old_q, old_l = with_shape(VectorCard.read(q), None), with_shape(VectorCard.read(ll), None)
    from search_world import repo_files

    name = request.node.name.replace("_", "-")[:40].strip("-")
    for i in range(3):
        put_repo(own_hub, f"untag/{name}-oldq{i}", repo_files(q, old_q, f"untag/{name}-oldq{i}"))
    put_repo(own_hub, f"untag/{name}-oldl", repo_files(ll, old_l, f"untag/{name}-oldl"))
    push(q, f"untag/{name}-new", progress=False)
    push(ll, f"untag/{name}-newl", progress=False)
    target = str(trio("qwen2_plain").target)

    fast = search(name, base=target)
    assert [h.repo_id for h in fast.hits] == [f"untag/{name}-new"] and fast.untagged_read is None
    slow = search(name, base=target, include_untagged=True)
    assert sorted(h.repo_id for h in slow.hits) == sorted([f"untag/{name}-new", *(f"untag/{name}-oldq{i}"
                                                                                 for i in range(3))])
    assert [h.repo_id for h in slow.rejected] == [f"untag/{name}-oldl"]  # read, and refused by the real check
    assert (slow.untagged_read, slow.other_shapes_skipped) == (4, 1)
    shown = CliRunner().invoke(app, ["search", "--query", name, "--base", target])
    assert shown.exit_code == 0 and "vectors pushed without fit tags were skipped" in shown.stdout
    shown = CliRunner().invoke(app, ["search", "--query", name, "--base", target, "--include-untagged"])
    assert "also read 4 untagged vector(s) card by card; skipped 1 tagged with another shape" in shown.stdout


def test_a_listing_that_lies_is_filtered_by_the_real_check(request, own_hub, vector, trio):
    """A repo whose tags claim the target's shape but whose card is llama's: listed, read, refused."""
    from search_world import repo_files

    target = str(trio("qwen2_plain").target)
    tag_of_target = shape_hash(open_target(target))
    name = request.node.name.replace("_", "-")[:40].strip("-")
    liar = with_shape(VectorCard.read(vector("llama_plain")), tag_of_target)
    put_repo(own_hub, f"liar/{name}-lies", repo_files(vector("llama_plain"), liar, f"liar/{name}-lies"))
    push(vector("qwen2_plain"), f"liar/{name}-honest", progress=False)
    found = search(name, base=target)
    assert [h.repo_id for h in found.hits] == [f"liar/{name}-honest"]
    assert [h.repo_id for h in found.rejected] == [f"liar/{name}-lies"]
    assert "architecture" in found.rejected[0].fit.reason


def test_cli_sort_limit_json(world500, on, trio):
    world = on(world500)
    target = str(trio("qwen2_plain").target)
    result = CliRunner().invoke(app, ["search", "--base", target, "--sort", "likes", "--limit", "4", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    likes = [h["likes"] for h in out["hits"]]
    assert len(likes) == 4 and likes == sorted(likes, reverse=True)
    assert out["shape_tag"] == f"rvhub-shape-{shape_hash(open_target(target))}"
    bad = CliRunner().invoke(app, ["search", "--sort", "stars"])
    assert bad.exit_code == 2 and "stars" in bad.stderr
    with pytest.raises(InvalidOptionError, match="--sort"):
        search(sort="stars")
    assert world.hub.page_size == 1000


# ------------------------------------------------------------------ the registry folder's index


def _local(tmp_path: Path, vector, n_llama: int = 6) -> tuple[Path, list[str]]:
    root = tmp_path / "reg"
    fits = [f"org/fit-{i}" for i in range(3)]
    for repo in fits:
        push(vector("qwen2_plain"), repo, registry=root, progress=False)
    for i in range(n_llama):
        push(vector("llama_plain"), f"org/llama-{i}", registry=root, progress=False)
    return root, fits


def _count_card_reads(monkeypatch) -> list[str]:
    from rvhub._local_registry import LocalRegistry

    reads: list[str] = []
    original = LocalRegistry.fetch_card

    def counted(self, ref):
        reads.append(ref.repo_id)
        return original(self, ref)

    monkeypatch.setattr(LocalRegistry, "fetch_card", counted)
    return reads


def test_local_search_reads_only_the_matches_cards(tmp_path, vector, trio, monkeypatch):
    root, fits = _local(tmp_path, vector)
    index = root / ".rvhub" / "index.json"
    assert index.is_file() and set(json.loads(index.read_text())["repos"]) == {*fits, *(f"org/llama-{i}"
                                                                                        for i in range(6))}
    reads = _count_card_reads(monkeypatch)
    found = search(base=str(trio("qwen2_plain").target), registry=root)
    assert sorted(h.repo_id for h in found.hits) == fits and found.rejected == []
    assert sorted(reads) == fits  # the index chose them: no llama card was read
    latest = search(registry=root, sort="last_modified", limit=2)
    dates = [h.listed.last_modified for h in latest.hits]
    assert len(dates) == 2 and dates == sorted(dates, reverse=True) and all(dates)
    with pytest.raises(InvalidOptionError, match="no downloads or likes"):
        search(registry=root, sort="downloads")


@pytest.mark.parametrize("damage", [
    "not json", "[" * 10_000, json.dumps({"rvhub_index": 1, "folders": {}, "repos": {"../x": {}}}),
    "symlink", "missing",
])
def test_a_hostile_local_index_is_refused_and_rebuilt(tmp_path, vector, trio, damage):
    root, fits = _local(tmp_path, vector, n_llama=2)
    index = root / ".rvhub" / "index.json"
    outside = tmp_path / "outside.json"
    outside.write_text("keep me")
    index.unlink()
    if damage == "symlink":
        index.symlink_to(outside)
    elif damage != "missing":
        index.write_text(damage)
    found = search(base=str(trio("qwen2_plain").target), registry=root)
    assert sorted(h.repo_id for h in found.hits) == fits
    assert not index.is_symlink() and outside.read_text() == "keep me"
    assert set(json.loads(index.read_text())["repos"]) == {*fits, "org/llama-0", "org/llama-1"}


def test_a_lying_local_index_is_caught_by_the_real_check_and_new_repos_are_found(tmp_path, vector, trio):
    root, fits = _local(tmp_path, vector, n_llama=2)
    index = root / ".rvhub" / "index.json"
    data = json.loads(index.read_text())
    data["repos"]["org/llama-0"]["tags"] = data["repos"]["org/fit-0"]["tags"]  # claims the target's shape
    index.write_text(json.dumps(data))
    found = search(base=str(trio("qwen2_plain").target), registry=root)
    assert sorted(h.repo_id for h in found.hits) == fits
    assert [h.repo_id for h in found.rejected] == ["org/llama-0"]
    # a repo copied in by hand (no push, no index update) is found: its org folder changed
    import shutil

    shutil.copytree(root / "org" / "fit-0", root / "org" / "fit-copied", symlinks=True)
    found = search(base=str(trio("qwen2_plain").target), registry=root)
    assert "org/fit-copied" in [h.repo_id for h in found.hits]

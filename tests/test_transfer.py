"""Resumable transfers against the local Hub server (tests/hub_server.py), counting the bytes the server sent
and received: a download cut at any byte resumes where it stopped, in the same call and in the next one; a
push that fails after half its shards, or loses its connection at 30% of one, resumes without sending again
what landed, in one commit. Hostile answers to a Range request are handled safely (tests/hostile_hub.py).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from hostile_hub import Hostile

from rvhub import _transfer
from rvhub._hub_guard import repo_cache
from rvhub.card import VectorCard
from rvhub.errors import HostileServerError, IntegrityError, RegistryUnavailableError
from rvhub.registry import pull, push

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

VECTOR_FILE = "vector.safetensors"


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch, capfd, caplog):
    monkeypatch.setattr(_transfer, "RETRY_WAIT_S", 0.0)
    yield
    out, err = capfd.readouterr()
    assert HUB_TOKEN not in out + err + caplog.text


def repo_name(request) -> str:
    return "rvtest/" + re.sub(r"[^\w]+", "_", request.node.name)[:80].strip("_")


def entry(folder: Path, name: str = VECTOR_FILE):
    return next(e for e in VectorCard.read(folder).files if e.path == name)


def blobs(repo: str) -> dict[str, int]:
    folder = repo_cache(repo) / "blobs"
    return {p.name: p.stat().st_size for p in folder.iterdir()} if folder.is_dir() else {}


# ------------------------------------------------------------------ downloads


@pytest.mark.parametrize("where", ["first byte", "30%", "last byte"])
def test_a_download_cut_at_any_byte_resumes_in_the_same_call(request, hub, hub_env, vector, tmp_path, where):
    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    size = entry(vec).size
    cut = {"first byte": 1, "30%": int(0.3 * size), "last byte": size - 1}[where]
    hub.cut_downloads(VECTOR_FILE, cut, cut + 1000)  # two cuts: the resumed request is cut again
    result = pull(repo, out=tmp_path / "vec", progress=False)
    assert (Path(result.path) / VECTOR_FILE).read_bytes() == (vec / VECTOR_FILE).read_bytes()
    assert hub.sent[VECTOR_FILE] == size  # no byte sent twice
    gets = [p for m, p, _ in hub.log if m == "GET" and p.startswith(f"/{repo}/resolve/") and p.endswith(VECTOR_FILE)]
    assert len(gets) == (3 if cut + 1000 < size else 2)


def test_a_download_redirected_to_a_cdn_resumes_there(request, hub, hub_env, vector, tmp_path):
    """As on the Hub: the LFS file's bytes come from a CDN whose answers carry their own ETag."""
    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    size = entry(vec).size
    hub.cut_downloads(VECTOR_FILE, int(0.3 * size))
    hub.redirect_lfs = True
    try:
        result = pull(repo, out=tmp_path / "vec", progress=False)
    finally:
        hub.redirect_lfs = False
    assert (Path(result.path) / VECTOR_FILE).read_bytes() == (vec / VECTOR_FILE).read_bytes()
    assert hub.sent[VECTOR_FILE] == size
    cdn = [p for m, p, _ in hub.log if m == "GET" and p.startswith(f"/_cdn/{entry(vec).sha256}/")]
    assert len(cdn) >= 2  # the cut request and the resumed one (earlier tests may have fetched it too)


def test_a_download_that_gives_up_resumes_in_the_next_call(request, hub, hub_env, vector, tmp_path):
    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    e = entry(vec)
    cut = int(0.3 * e.size)
    hub.cut_downloads(VECTOR_FILE, *[cut] * (1 + _transfer.STALLED_TRIES))  # 30%, then nothing more
    with pytest.raises(RegistryUnavailableError, match="connection to the Hub at .* failed"):
        pull(repo, out=tmp_path / "vec", progress=False)
    assert not (tmp_path / "vec").exists()
    assert blobs(repo).get(f"{e.sha256}.incomplete") == cut and e.sha256 not in blobs(repo)  # kept, not cached
    assert not (repo_cache(repo) / "snapshots" / hub.history(repo)[0] / VECTOR_FILE).exists()
    assert hub.sent[VECTOR_FILE] == cut

    result = pull(repo, out=tmp_path / "vec", progress=False)
    assert (Path(result.path) / VECTOR_FILE).read_bytes() == (vec / VECTOR_FILE).read_bytes()
    assert hub.sent[VECTOR_FILE] == e.size  # the second call sent the other 70% only
    assert f"{e.sha256}.incomplete" not in blobs(repo) and blobs(repo)[e.sha256] == e.size


def test_an_interrupted_download_keeps_its_bytes_for_the_next_call(request, hub, hub_env, vector, tmp_path,
                                                                    monkeypatch):
    from rvhub._io import Interrupted, check_stop

    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    e = entry(vec)

    def stop() -> None:  # Ctrl-C after the first chunk written
        raise Interrupted(2)

    monkeypatch.setattr(_transfer, "check_stop", stop)
    with pytest.raises(Interrupted):
        pull(repo, out=tmp_path / "vec", progress=False)
    kept = blobs(repo)[f"{e.sha256}.incomplete"]
    assert 0 < kept < e.size and e.sha256 not in blobs(repo) and not (tmp_path / "vec").exists()
    monkeypatch.setattr(_transfer, "check_stop", check_stop)
    hub.sent.clear()
    result = pull(repo, out=tmp_path / "vec", progress=False)
    assert (Path(result.path) / VECTOR_FILE).read_bytes() == (vec / VECTOR_FILE).read_bytes()
    assert hub.sent[VECTOR_FILE] == e.size - kept  # a Range from where it stopped


def test_a_damaged_partial_file_never_becomes_a_cached_blob(request, hub, hub_env, vector, tmp_path, caplog):
    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    e = entry(vec)
    partial = _transfer.partial_path(repo, e.sha256)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\x00" * 1000)  # not the file's first bytes
    result = pull(repo, out=tmp_path / "vec", progress=False)
    assert (Path(result.path) / VECTOR_FILE).read_bytes() == (vec / VECTOR_FILE).read_bytes()
    assert hub.sent[VECTOR_FILE] == (e.size - 1000) + e.size  # the rest, then (it did not check out) all of it
    assert "does not match its card; downloading it again" in caplog.text


def test_a_partial_file_planted_as_a_symlink_is_not_written_through(request, hub, hub_env, vector, tmp_path):
    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    partial = _transfer.partial_path(repo, entry(vec).sha256)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.symlink_to(victim)
    with pytest.raises(HostileServerError, match="as a symlink: not followed"):
        pull(repo, out=tmp_path / "vec", progress=False)
    assert victim.read_bytes() == b"precious" and not (tmp_path / "vec").exists()


def test_a_tampered_file_is_neither_cached_nor_kept_partially(request, hub, hub_env, vector, tmp_path):
    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    hub.tamper(repo, VECTOR_FILE)
    with pytest.raises(IntegrityError, match=r"vector\.safetensors of .* does not match the size and sha256"):
        pull(repo, out=tmp_path / "vec", progress=False)
    assert not any(n.startswith(entry(vec).sha256) for n in blobs(repo))


def test_a_range_answered_with_the_whole_file_restarts_it_safely(request, hub, hub_env, vector, tmp_path):
    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    size = entry(vec).size
    hub.cut_downloads(VECTOR_FILE, int(0.3 * size))
    hub.hostile = Hostile(target=VECTOR_FILE, ignore_range=True)  # a 200 with the full body to the Range GET
    result = pull(repo, out=tmp_path / "vec", progress=False)
    assert (Path(result.path) / VECTOR_FILE).read_bytes() == (vec / VECTOR_FILE).read_bytes()
    assert hub.hostile.sent[VECTOR_FILE] == size


@pytest.mark.parametrize("mode", ["wrong range", "other etag", "other commit"])
def test_a_lying_range_answer_is_refused_and_the_partial_file_dropped(request, hub, hub_env, vector, tmp_path, mode):
    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    e = entry(vec)
    hub.cut_downloads(VECTOR_FILE, int(0.3 * e.size))
    hub.hostile = {
        "wrong range": Hostile(target=VECTOR_FILE, drop_range=True),  # 206 with bytes 0-… instead of 30%-…
        "other etag": Hostile(target=VECTOR_FILE, range_etag='"' + "ab" * 32 + '"'),
        "other commit": Hostile(target=VECTOR_FILE, range_etag=f'"{e.sha256}"', commit="cd" * 20),
    }[mode]
    if mode == "other commit":  # the HEAD must stay honest: lie about the commit on the Range GET only
        hub.hostile.commit = None
        hub.hostile.range_etag = None
        orig = hub.hostile.rewrite

        def rewrite(h, headers):
            headers = orig(h, headers)
            return {**headers, "X-Repo-Commit": "cd" * 20} if h.headers.get("Range") else headers

        hub.hostile.rewrite = rewrite  # type: ignore[method-assign]
    with pytest.raises(HostileServerError, match="refused, nothing was written"):
        pull(repo, out=tmp_path / "vec", progress=False)
    assert not (tmp_path / "vec").exists()
    assert not any(n.startswith(e.sha256) for n in blobs(repo))  # neither the partial file nor a blob


def test_offline_pull_after_a_resumed_download_uses_the_cache(request, hub, hub_env, vector, tmp_path, monkeypatch):
    from huggingface_hub import constants

    vec = vector("qwen2_wide")
    repo = repo_name(request)
    push(vec, repo, progress=False)
    hub.cut_downloads(VECTOR_FILE, 5000)
    first = pull(repo, progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = pull(f"{repo}@{first.commit}", out=tmp_path / "vec", progress=False)
    assert (Path(again.path) / VECTOR_FILE).read_bytes() == (vec / VECTOR_FILE).read_bytes()


# ------------------------------------------------------------------ pushes


@pytest.fixture
def sharded(vector, hub):
    """A vector in 10 shards that the server has not stored yet (its LFS store is shared by all repos)."""
    vec = vector("qwen2_wide", max_shard_size="100KB")
    shards = [e for e in VectorCard.read(vec).files if e.path.endswith(".safetensors")]
    assert len(shards) >= 4
    with hub.lock:
        for s in shards:
            hub.lfs.pop(s.sha256, None)
    return vec, shards


def test_a_push_that_fails_after_half_its_shards_resumes_without_sending_them_again(
    request, hub, hub_env, sharded, monkeypatch
):
    vec, shards = sharded
    repo = repo_name(request)
    monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub's and rvhub's retry waits
    hub.fail_lfs_uploads(after=len(shards) // 2)  # then the server answers 500 to every LFS upload
    with pytest.raises(RegistryUnavailableError, match="answered 500"):
        push(vec, repo, progress=False)
    landed = {s.sha256 for s in shards} & set(hub.lfs)
    assert len(landed) == len(shards) // 2
    assert len(hub.history(repo)) == 1  # only the repo's initial commit: nothing was committed
    before = dict(hub.received)
    hub.faults.clear()

    result = push(vec, repo, progress=False)
    assert result.committed and hub.history(repo)[0] == result.commit and len(hub.history(repo)) == 2  # one commit
    for s in shards:
        sent_now = hub.received[s.sha256] - before.get(s.sha256, 0)
        assert sent_now == (0 if s.sha256 in landed else s.size), s.path  # what landed is not sent again
    for s in shards:
        if s.sha256 in landed:
            assert hub.received[s.sha256] == s.size  # sent once, over both pushes


def test_a_connection_dropped_at_30_percent_of_a_shard_resends_that_shard_only(request, hub, hub_env, sharded,
                                                                              monkeypatch):
    vec, shards = sharded
    repo = repo_name(request)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    hub.cut_lfs_uploads(0.3)
    result = push(vec, repo, progress=False)
    assert result.committed and len(hub.history(repo)) == 2
    cut = [s for s in shards if hub.received[s.sha256] != s.size]
    assert len(cut) == 1 and hub.received[cut[0].sha256] == int(0.3 * cut[0].size) + cut[0].size
    again = push(vec, repo, progress=False)  # and an identical push sends nothing, commits nothing
    assert not again.committed and all(hub.received[s.sha256] == s.size for s in shards if s not in cut)


def test_a_push_whose_connection_keeps_dropping_resumes_in_the_next_push(request, hub, hub_env, sharded, monkeypatch):
    vec, shards = sharded
    repo = repo_name(request)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    hub.cut_lfs_uploads(*[0.3] * 1000, after=len(shards) // 2)  # half land, then every upload is cut at 30%
    with pytest.raises(RegistryUnavailableError, match="connection to the Hub at .* failed"):
        push(vec, repo, progress=False)
    landed = {s.sha256 for s in shards} & set(hub.lfs)
    assert len(landed) == len(shards) // 2 and len(hub.history(repo)) == 1
    before = dict(hub.received)
    hub.faults.clear()
    result = push(vec, repo, progress=False)
    assert result.committed and len(hub.history(repo)) == 2
    assert all(hub.received[s.sha256] - before.get(s.sha256, 0) == (0 if s.sha256 in landed else s.size)
               for s in shards)

"""A Hub-compatible server that lies (tests/hostile_hub.py), against the real huggingface_hub client over real
HTTP: path-like ETags and commits, lying sizes, endless bodies, echoed credentials, each error status at each
step, malformed JSON.

For each: nothing written or deleted outside what rvhub owns (a "victim" file outside stays as it was), one
clear line on stderr, exit code 1, no traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from helpers import run_cli
from hostile_hub import ENDLESS_CAP, Hostile
from huggingface_hub import HfApi
from typer.testing import CliRunner

from rvhub._hub_guard import repo_cache
from rvhub._hub_registry import HubRegistry
from rvhub.card import VectorCard
from rvhub.cli import app
from rvhub.errors import HostileServerError
from rvhub.registry import push

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
VECTOR_FILE = "vector.safetensors"


@pytest.fixture(scope="module")
def hub():
    """A server of this module's own: what the hostile modes leave on it (repos, LFS objects the same vector
    uploaded) must not change what the other modules' tests see on the shared one."""
    from hub_server import LocalHub

    server = LocalHub.start(HUB_TOKEN)
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    """huggingface_hub waits 1, 2, 4, 8 s between retries of a 429/5xx; the waits are not what is tested."""
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda s: None)


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim" / "f"
    path.parent.mkdir()
    path.write_bytes(b"precious")
    return path


def assert_victim_intact(victim: Path) -> None:
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["f"], "something was written next to the victim"


def published(request, vector, hub_env) -> str:
    repo = "rvtest/" + request.node.name.split("[")[0][:60] + "_" + str(abs(hash(request.node.name)) % 10**6)
    push(vector("qwen2_plain"), repo, progress=False)
    return repo


def invoke(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert HUB_TOKEN not in result.output + (result.stderr or "")
    return result


def one_error(result, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code,
                                                                                         result.stderr)
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def traversal(repo: str, victim: Path) -> str:
    """An ETag that, used as a blob name, would land on ``victim``."""
    return '"' + os.path.relpath(victim, repo_cache(repo) / "blobs") + '"'


# ------------------------------------------------------------------ item 1: paths from the server


@pytest.mark.parametrize("target", ["rvhub.json", VECTOR_FILE])
def test_a_path_like_etag_is_refused_before_anything_is_written(request, hub, hub_env, vector, victim, target):
    repo = published(request, vector, hub_env)
    hub.hostile = Hostile(target=target, etag=traversal(repo, victim))
    for _ in range(2):  # a second pull would have overwritten what the first one wrote
        one_error(invoke("pull", repo, "--quiet"), "an ETag that is not a git sha1 or a sha256", repo)
        assert_victim_intact(victim)
    cache = repo_cache(repo)
    assert all(p.resolve().is_relative_to(cache.resolve()) for p in cache.rglob("*"))


def test_a_path_like_commit_is_refused_on_files_and_on_not_found_answers(request, hub, hub_env, vector, victim):
    repo = published(request, vector, hub_env)
    evil = os.path.relpath(victim.parent, repo_cache(repo) / "snapshots")
    hub.hostile = Hostile(commit=evil)
    one_error(invoke("info", repo), "X-Repo-Commit", "40-digit")
    # huggingface_hub records a missing file under .no_exist/<X-Repo-Commit>/: that header is checked too
    hub.hostile = Hostile(fail={"head": (404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": evil})})
    one_error(invoke("info", repo), "X-Repo-Commit")
    assert_victim_intact(victim)


def test_a_cached_tree_listing_with_a_path_like_blob_name_is_refused(request, hub, hub_env, vector, victim):
    """With xet, huggingface_hub can take blob names from a tree listing cached by an earlier snapshot_download."""
    repo = published(request, vector, hub_env)
    commit = hub.history(repo)[0]
    listing = repo_cache(repo) / "trees" / f"{commit}.json"
    listing.parent.mkdir(parents=True)
    evil = {"size": 8, "blob_id": "0" * 40, "lfs_sha256": traversal(repo, victim).strip('"'), "lfs_size": 8}
    listing.write_text(json.dumps({"format_version": 1, "files": {VECTOR_FILE: evil}}))
    one_error(invoke("pull", f"{repo}@{commit}", "--quiet"), "tree listing", "not a sha256")
    assert_victim_intact(victim)


def test_discard_refuses_a_cached_link_that_leaves_the_cache(tmp_path, victim):
    """A damaged copy is dropped by removing its blob: never one that resolves outside the repo's blobs."""
    snapshot = tmp_path / "models--o--n" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / VECTOR_FILE).symlink_to(victim)
    with pytest.raises(HostileServerError, match="outside"):
        HubRegistry().discard(snapshot, [VECTOR_FILE])
    assert_victim_intact(victim)


def test_check_base_on_a_hub_model_with_a_path_like_etag(request, hub, hub_env, vector, trio, victim):
    model = "rvtest/model_" + str(abs(hash(request.node.name)) % 10**6)
    api = HfApi()
    api.create_repo(model, exist_ok=True)
    api.upload_folder(repo_id=model, folder_path=str(trio("qwen2_plain").target))
    hub.hostile = Hostile(target="config.json", etag=traversal(model, victim))
    one_error(invoke("check", vector("qwen2_plain"), "--base", model), "ETag", model)
    hub.hostile = Hostile(target="model.safetensors", etag=traversal(model, victim))
    one_error(invoke("apply", vector("qwen2_plain"), "--base", model, "-o", request.path.parent / "never"),
              "ETag")
    assert_victim_intact(victim)


# ------------------------------------------------------------------ item 4: sizes


def test_a_lying_content_length_is_refused_at_the_declared_size(request, hub, hub_env, vector, victim):
    repo = published(request, vector, hub_env)
    size = next(e.size for e in VectorCard.read(vector("qwen2_plain")).files if e.path == VECTOR_FILE)
    hub.hostile = Hostile(target=VECTOR_FILE, content_length=100_000_000)
    one_error(invoke("pull", repo, "--quiet"), "100,000,000 bytes", f"declared size is {size:,}")
    assert hub.hostile.sent[VECTOR_FILE] == 0  # refused at the HEAD, before any body


def test_an_endless_body_is_cut_at_the_declared_size(request, hub, hub_env, vector, tmp_path):
    repo = published(request, vector, hub_env)
    size = next(e.size for e in VectorCard.read(vector("qwen2_plain")).files if e.path == VECTOR_FILE)
    hub.hostile = Hostile(target=VECTOR_FILE, endless=True)
    one_error(invoke("pull", repo, "-o", tmp_path / "out", "--quiet"), f"more than {size:,} bytes",
              "download was stopped")
    assert hub.hostile.sent[VECTOR_FILE] < ENDLESS_CAP // 2  # the client stopped; the server did not give up
    assert not (tmp_path / "out").exists()
    blobs = repo_cache(repo) / "blobs"
    assert all(p.stat().st_size <= size + (1 << 20) for p in blobs.iterdir())


def test_a_range_read_cut_midway_is_one_line(request, hub, hub_env, vector, trio):
    model = "rvtest/model_" + str(abs(hash(request.node.name)) % 10**6)
    api = HfApi()
    api.create_repo(model, exist_ok=True)
    api.upload_folder(repo_id=model, folder_path=str(trio("qwen2_plain").target))
    hub.hostile = Hostile(target="model.safetensors", drop_range=True)
    one_error(invoke("check", vector("qwen2_plain"), "--base", model), model)


def test_a_server_that_ignores_range_is_refused_not_downloaded(hub, hub_model, vector):
    hub.hostile = Hostile(target="model.safetensors", ignore_range=True)
    one_error(invoke("check", vector("qwen2_plain"), "--base", hub_model), "ignored the Range request")


# ------------------------------------------------------------------ item 3: the token


def test_scrub_replaces_tokens_bearer_credentials_and_hf_tokens(monkeypatch):
    import logging

    from rvhub._secrets import ScrubFilter, scrub

    monkeypatch.setenv("HF_TOKEN", "s3cret-token-value")
    text = "got s3cret-token-value; Authorization: Bearer abc.def; also hf_abcdefghijklmnopqrstuvwxyz"
    assert scrub(text) == "got ***; Authorization: Bearer ***; also hf_***"
    try:
        raise ValueError("echoed s3cret-token-value")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.WARNING, __file__, 1, "sent %s", ("s3cret-token-value",),
                                   sys.exc_info())
    assert ScrubFilter().filter(record)
    assert record.getMessage() == "sent ***" and "s3cret" not in (record.exc_text or "")
    assert "ValueError: echoed ***" in (record.exc_text or "")


def test_an_echoed_token_is_scrubbed_from_the_traceback_under_debug(request, hub, hub_env, vector):
    repo = published(request, vector, hub_env)
    hub.hostile = Hostile(fail={"head": (400, {})}, echo_auth=True)
    done = run_cli("info", repo, "--debug", env=hub_env)
    assert done.returncode == 1 and "Traceback" in done.stderr  # --debug: the traceback is shown...
    assert HUB_TOKEN not in done.stdout + done.stderr  # ...without the token the server echoed
    assert "Bearer ***" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("error: ")


# ------------------------------------------------------------------ items 8 and 9: statuses and bad answers

STATUS_FRAGMENTS = {
    401: "refused the token",
    403: "denied",
    404: "404 (not found)",
    429: "try again in 7 s",
    500: "500 (server error)",
}


@pytest.mark.parametrize("status", sorted(STATUS_FRAGMENTS))
@pytest.mark.parametrize("step", ["head", "get"])
def test_each_status_on_a_file_download_has_its_own_message(request, hub, hub_env, vector, status, step):
    repo = published(request, vector, hub_env)
    hub.hostile = Hostile(target=VECTOR_FILE, fail={step: (status, {"Retry-After": "7"})})
    line = one_error(invoke("pull", repo, "--quiet"), STATUS_FRAGMENTS[status])
    assert "damaged" not in line and "could not be reached" not in line


@pytest.fixture
def hub_model(request, hub, hub_env, trio) -> str:
    """The plain qwen2 target, uploaded as a model repo."""
    model = "rvtest/model_" + str(abs(hash(request.node.name)) % 10**6)
    api = HfApi()
    api.create_repo(model, exist_ok=True)
    api.upload_folder(repo_id=model, folder_path=str(trio("qwen2_plain").target))
    return model


@pytest.mark.parametrize("status", sorted(STATUS_FRAGMENTS))
@pytest.mark.parametrize("step", ["model_info", "head", "get", "range"])
def test_each_status_reading_a_hub_base_has_its_own_message(hub, hub_model, vector, status, step):
    target = "model.safetensors" if step == "range" else "config.json"
    hub.hostile = Hostile(target=target, fail={step: (status, {"Retry-After": "7"})})
    line = one_error(invoke("check", vector("qwen2_plain"), "--base", hub_model), STATUS_FRAGMENTS[status])
    assert "could not be reached" not in line and "unreachable" not in line
    if status == 401:
        assert "repo not found" not in line


@pytest.mark.parametrize("status", sorted(STATUS_FRAGMENTS))
@pytest.mark.parametrize("step", ["preupload", "lfs_put", "commit", "tree"])
def test_each_status_at_each_push_step_has_its_own_message(request, hub, hub_env, vector, status, step, caplog):
    repo = published(request, vector, hub_env)
    hub.hostile = Hostile(fail={step: (status, {"Retry-After": "7"})})
    other = vector("qwen2_plain", format="dense")
    line = one_error(invoke("push", other, repo, "--quiet"), STATUS_FRAGMENTS[status])
    assert "damaged" not in line
    names = {"preupload": "preupload", "lfs_put": "an upload", "commit": "commit", "tree": "the file listing"}
    if status >= 500:
        assert f"on {names[step]}" in line
    if status >= 500 and step != "tree":  # rvhub retries the commit (its preupload and uploads included)
        retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
        assert retries and all(f"on {names[step]}" in m for m in retries)
        assert not any("failed on commit" in m for m in retries)


@pytest.mark.parametrize("status", sorted(STATUS_FRAGMENTS))
def test_each_status_on_the_model_list_has_its_own_message(hub, hub_env, status):
    hub.hostile = Hostile(fail={"list_models": (status, {"Retry-After": "7"})})
    line = one_error(invoke("search"), STATUS_FRAGMENTS[status])
    assert status in (401, 403, 429) or "on the model list" in line


@pytest.mark.parametrize("step", ["model_info", "tree", "list_models"])
def test_bad_json_is_one_line(request, hub, hub_env, vector, step):
    repo = published(request, vector, hub_env)
    hub.hostile = Hostile(bad_json={step})
    args = {"model_info": ("push", vector("qwen2_plain", format="dense"), repo, "--quiet"),
            "tree": ("push", vector("qwen2_plain", format="dense"), repo, "--quiet"),
            "list_models": ("search",)}[step]
    one_error(invoke(*args), "an answer rvhub cannot read")


def test_a_null_commit_and_a_model_list_that_is_an_object(request, hub, hub_env, vector, trio):
    repo = published(request, vector, hub_env)
    hub.hostile = Hostile(null_sha=True)
    one_error(invoke("push", vector("qwen2_plain", format="dense"), repo, "--quiet"), "not a commit id")
    one_error(invoke("check", vector("qwen2_plain"), "--base", repo), "40-digit hex sha1")
    hub.hostile = Hostile(models_object=True)
    one_error(invoke("search"), "an answer rvhub cannot read")


def test_one_bad_id_from_the_server_does_not_end_search_base(request, hub, hub_env, vector, trio):
    repo = published(request, vector, hub_env)
    hub.hostile = Hostile(extra_ids=["evil/new\nline", "evil/n\u00e4me", "evil/../x"])
    result = invoke("search", "--base", trio("qwen2_plain").target, "--limit", 1000, "--json")
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    assert repo in [h["repo_id"] for h in found["hits"]]
    bad = [h["repo_id"] for h in found["rejected"] if h["repo_id"].startswith("evil/")]
    assert bad == ["evil/new\\nline", "evil/n\\xe4me", "evil/../x"]
    assert "\n" not in "".join(bad)


def test_a_body_shorter_than_declared_is_one_line(request, hub, hub_env, vector):
    """HEAD declares the real size, GET a smaller one and sends that: huggingface_hub's "Consistency check
    failed"; a body cut off again and again: its retries give up."""
    repo = published(request, vector, hub_env)
    hub.hostile = Hostile(target=VECTOR_FILE, get_length=100)
    one_error(invoke("pull", repo, "--quiet"), "of another size than it declared")
    hub.hostile = None
    hub.drop_next_downloads(VECTOR_FILE, n=20, after_bytes=100)
    one_error(invoke("pull", repo, "--quiet"), "connection to", "failed")


def test_an_honest_server_still_serves_a_hub_base_to_check_and_apply(hub_model, vector, trio, tmp_path):
    """The control: the same paths with an honest server give what a local base gives."""
    from helpers import assert_bitwise_equal, load_tensors

    from rvhub.apply import apply

    result = invoke("check", vector("qwen2_plain"), "--base", hub_model)
    assert result.exit_code == 0, result.stderr
    remote = apply(vector("qwen2_plain"), hub_model, tmp_path / "remote", progress=False)
    local = apply(vector("qwen2_plain"), str(trio("qwen2_plain").target), tmp_path / "local", progress=False)
    assert_bitwise_equal(load_tensors(Path(remote.out)), load_tensors(Path(local.out)), "Hub base vs local base")


# ------------------------------------------------------------------ item 6: the Hub cache is the registry's own


def test_pull_into_the_hub_cache_is_refused_and_a_cached_copy_can_be_pushed_elsewhere(request, hub, hub_env,
                                                                                      vector, tmp_path):
    from huggingface_hub import constants

    repo = published(request, vector, hub_env)
    cache = Path(constants.HF_HUB_CACHE)
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    one_error(invoke("pull", repo, "-o", cache, "--overwrite", "--quiet"), "an input of this command or a folder")
    one_error(invoke("pull", repo, "-o", cache / "inside", "--quiet"), "an input of this command or a folder")
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before  # nothing removed, nothing added
    pulled = invoke("pull", repo, "--json", "--quiet")  # without -o: the verified copy in the cache
    assert pulled.exit_code == 0, pulled.stderr
    copy = Path(json.loads(pulled.stdout)["path"])
    assert copy.is_relative_to(cache)
    again = invoke("push", copy, repo + "_copy", "--quiet")  # a push only reads the folder
    assert again.exit_code == 0, again.stderr
    assert HfApi().model_info(repo + "_copy").sha


# ------------------------------------------------------------------ item 4: JSON from the server, bounded


def test_a_cached_tree_listing_too_deep_to_parse_is_refused(request, hub, hub_env, vector, victim):
    repo = published(request, vector, hub_env)
    commit = hub.history(repo)[0]
    listing = repo_cache(repo) / "trees" / f"{commit}.json"
    listing.parent.mkdir(parents=True)
    listing.write_text('{"files": ' + "[" * 200_000 + "]" * 200_000 + "}")  # json.loads: RecursionError
    one_error(invoke("pull", f"{repo}@{commit}", "--quiet"), "tree listing", "cannot be read safely")
    assert_victim_intact(victim)


def test_a_previous_card_too_deep_to_parse_lists_no_files():
    from rvhub._hub_registry import _card_files

    assert _card_files(b'{"files": ' + b"[" * 200_000 + b"]" * 200_000 + b"}") == []  # no RecursionError
    assert _card_files(b'{"files": [{"path": "vector.safetensors"}]}') == ["vector.safetensors"]


@pytest.mark.parametrize("mode", ["commit", "endless", "content_length", "fail"])
def test_search_base_reads_each_card_in_one_bounded_get_and_refuses_a_lying_one(request, hub, hub_env, vector, trio,
                                                                                 mode):
    """search reads a match's card with one GET at the listed commit, not cached: a card of another commit, one
    larger than a card may be, or an error is that repo's rejection, and the search goes on; the control
    (an honest server) finds it."""
    from rvhub.card import CARD_FILE

    repo = published(request, vector, hub_env)
    target = trio("qwen2_plain").target

    def run() -> dict:
        result = invoke("search", "--base", target, "--limit", 1000, "--json")
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    before = len(hub.log)
    honest = run()
    assert repo in [h["repo_id"] for h in honest["hits"]]
    card_requests = [(m, p) for m, p, _ in hub.log[before:] if p.endswith(f"/{CARD_FILE}") and repo in p]
    assert card_requests == [("GET", card_requests[0][1])] and "/resolve/" in card_requests[0][1]
    hub.hostile = {
        "commit": Hostile(target=CARD_FILE, commit="0" * 40),
        "endless": Hostile(target=CARD_FILE, endless=True),
        "content_length": Hostile(target=CARD_FILE, content_length=(16 << 20) + 1),
        "fail": Hostile(target=CARD_FILE, fail={"get": (500, {})}),
    }[mode]
    lied = run()
    assert repo not in [h["repo_id"] for h in lied["hits"]]
    reason = next(h["fit"]["reason"] for h in lied["rejected"] if h["repo_id"] == repo)
    expected = {"commit": ["commit 000000000000"], "content_length": ["bytes for"], "fail": ["500"],
                # the fixture's cap on endless bodies counts all the session's cards together: with several
                # matches read at once it may close a connection before this client reached its own cap
                "endless": ["more than", "RemoteProtocolError"]}[mode]
    assert any(e in reason for e in expected), reason

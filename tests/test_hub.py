"""The registries: push, pull (--apply), info and search against the local Hub server (the real huggingface_hub
client over real HTTP, tests/hub_server.py) and against a local registry folder, with the same tests.

Faults: a commit answered with 500, a download cut mid-body, a file tampered on the server, a missing repo,
revision or token. The token must never show up in any output: every test here checks what it printed
and logged, and the CLI round trip runs real processes.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from helpers import assert_bitwise_equal, assert_no_output, load_tensors, run_cli
from huggingface_hub import HfApi, constants
from typer.testing import CliRunner

from rvhub._public import public_card
from rvhub.apply import apply
from rvhub.card import VectorCard
from rvhub.cli import app
from rvhub.errors import (
    AuthError,
    IntegrityError,
    InvalidOptionError,
    RegistryUnavailableError,
    RepoNotFoundError,
    RevisionNotFoundError,
    VectorFormatError,
)
from rvhub.registry import info, pull, pull_apply, push, search

# huggingface_hub's LFS upload hands httpx a file object (its own choice, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture(autouse=True)
def _no_token_in_output(capfd, caplog, monkeypatch):
    """Whatever a test printed (fd level: progress bars too) or logged must not contain the token."""
    monkeypatch.delenv("RVHUB_DEBUG", raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():  # the in-process CLI installs its own
        signal.signal(s, h)
    out, err = capfd.readouterr()
    assert HUB_TOKEN not in out + err + caplog.text


@pytest.fixture(params=["hub", "local"])
def registry(request, hub_env, tmp_path):
    """The registry argument for the library calls: None (the Hub, via hub_env) or a registry folder."""
    return None if request.param == "hub" else tmp_path / "registry"


def repo_name(request, suffix: str = "") -> str:
    return "rvtest/" + re.sub(r"[^\w]+", "_", request.node.name)[:80].strip("_") + suffix


def invoke(*args: object, env: dict[str, str] | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert HUB_TOKEN not in result.output + (result.stderr or "")
    return result


def one_error(result, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------ the round trip, in real processes


def test_push_info_search_pull_apply_round_trip_cli(request, hub, hub_env, vector, trio, tmp_path):
    vec, t = vector("qwen2_plain"), trio("qwen2_plain")
    repo = repo_name(request)
    outputs = []

    def rvhub(*args):
        done = run_cli(*args, env=hub_env)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        return done

    for e in VectorCard.read(vec).files:  # an earlier test may have left these objects on the session server
        hub.lfs.pop(e.sha256, None)
    done = rvhub("push", vec, repo, "--json")  # progress bars on: they must not leak the token either
    assert "vector.safetensors" in done.stderr  # the upload's progress bar
    pushed = json.loads(done.stdout)
    assert pushed["committed"] and pushed["commit"] == hub.history(repo)[0]
    assert sorted(pushed["uploaded"]) == ["README.md", "rvhub.json", "vector.safetensors"]

    shown = rvhub("info", repo).stdout
    card = VectorCard.read(vec)
    assert f"{repo} @ {pushed['commit'][:12]}" in shown and "form: sparse, exact" in shown
    assert f"rl (sha256 {card.source_to.content_sha256[:12]})" in shown and "vector.safetensors" in shown
    assert card.source_to.id not in shown  # published as the folder's name and content hash only

    found = json.loads(rvhub("search", "--query", repo.split("/")[1], "--json").stdout)
    assert [h["repo_id"] for h in found["hits"]] == [repo]

    out = tmp_path / "merged"
    done = rvhub("pull", repo, "--apply", "--base", t.target, "-o", out, "-a", "0.5", "--json", "--quiet")
    assert done.stderr == ""  # --quiet: no download or apply progress bar
    pulled = json.loads(done.stdout)
    assert pulled["commit"] == pushed["commit"] and pulled["applied"]["out"] == str(out)
    local = apply(vec, str(t.target), tmp_path / "local", scale=0.5, progress=False)
    assert_bitwise_equal(load_tensors(out), load_tensors(Path(local.out)), "pull --apply vs local apply")
    assert json.loads((out / "config.json").read_text())["rvhub_test_role"] == "target"
    assert all(HUB_TOKEN not in text for text in outputs)


# ------------------------------------------------------------------ the same behaviour on both registries


def test_identical_push_makes_no_commit_and_a_new_vector_replaces_the_old_files(request, registry, vector, tmp_path):
    repo = repo_name(request)
    first = push(vector("qwen2_plain"), repo, registry=registry, progress=False)
    again = push(vector("qwen2_plain"), repo, registry=registry, progress=False)
    assert first.committed and not again.committed and again.commit == first.commit and again.uploaded == []

    sharded = vector("qwen2_plain", max_shard_size="20KB")
    second = push(sharded, repo, registry=registry, message="sharded", progress=False)
    assert second.committed and second.deleted == ["vector.safetensors"]
    pulled = pull(repo, registry=registry, out=tmp_path / "v", progress=False)
    names = sorted(p.name for p in Path(pulled.path).iterdir())
    assert names == sorted([*(e.path for e in VectorCard.read(sharded).files), "rvhub.json"])
    # the first commit is still there, by its id
    old = pull(f"{repo}@{first.commit}", registry=registry, out=tmp_path / "old", progress=False)
    assert_bitwise_equal(load_tensors(Path(old.path)), load_tensors(vector("qwen2_plain")))


def test_pull_apply_equals_a_local_apply(request, registry, vector, trio, tmp_path):
    vec, t = vector("llama_hard"), trio("llama_hard")
    repo = repo_name(request)
    push(vec, repo, registry=registry, progress=False)
    result = pull_apply(repo, str(t.target), tmp_path / "out", registry=registry, scale=-1.0, progress=False)
    local = apply(vec, str(t.target), tmp_path / "local", scale=-1.0, progress=False)
    assert result.applied is not None and result.applied.tensors_changed == local.tensors_changed
    assert_bitwise_equal(load_tensors(tmp_path / "out"), load_tensors(Path(local.out)))


def test_branches_and_revisions(request, registry, vector, tmp_path):
    repo = repo_name(request)
    main = push(vector("qwen2_plain"), repo, registry=registry, progress=False)
    dev = push(vector("qwen2_hard"), repo, registry=registry, revision="dev", progress=False)
    assert dev.committed and dev.branch == "dev"
    assert info(repo, registry=registry).commit == main.commit
    published = {name: public_card(VectorCard.read(vector(name)))[0] for name in ("qwen2_hard", "qwen2_plain")}
    assert info(f"{repo}@dev", registry=registry).card == published["qwen2_hard"]
    assert info(f"{repo}@{main.commit}", registry=registry).card == published["qwen2_plain"]
    with pytest.raises(RevisionNotFoundError, match="'nope' not found"):
        pull(f"{repo}@nope", registry=registry, out=tmp_path / "o", progress=False)
    assert_no_output(tmp_path / "o")


def test_tampered_file_is_refused_with_no_output(request, registry, hub, vector, trio, tmp_path):
    repo = repo_name(request)
    push(vector("qwen2_plain"), repo, registry=registry, progress=False)
    if registry is None:
        hub.tamper(repo, "vector.safetensors")
    else:  # the registry folder's stored copy (a hard link to the blob)
        snapshot = next((registry / repo / "snapshots").iterdir())
        data = bytearray((snapshot / "vector.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (snapshot / "vector.safetensors").write_bytes(bytes(data))
    for _ in range(2):  # refused again: the damaged copy is not kept as if it were good
        with pytest.raises(IntegrityError, match=r"vector\.safetensors of .* does not match the size and sha256"):
            pull(repo, registry=registry, out=tmp_path / "vec", progress=False)
        assert_no_output(tmp_path / "vec")
    with pytest.raises(IntegrityError, match=r"vector\.safetensors"):
        pull_apply(repo, str(trio("qwen2_plain").target), tmp_path / "out", registry=registry, progress=False)
    assert_no_output(tmp_path / "out")


def test_missing_repo_and_revision_are_one_clear_line(request, registry, hub_env, vector):
    where = [] if registry is None else ["--registry", registry]
    result = invoke("info", "rvtest/no-such-vector", *where)
    one_error(result, "'rvtest/no-such-vector' not found", "check the id")
    repo = repo_name(request)
    push(vector("qwen2_plain"), repo, registry=registry, progress=False)
    one_error(invoke("pull", f"{repo}@v9", *where), "revision 'v9' not found")
    pushed = invoke("push", vector("qwen2_plain"), repo, *where)
    assert pushed.exit_code == 0 and "no new commit" in pushed.stdout


def test_search_with_base_keeps_the_vectors_that_fit(registry, vector, trio, request):
    qwen, llama = repo_name(request, "-qwen"), repo_name(request, "-llama")
    push(vector("qwen2_plain"), qwen, registry=registry, progress=False)
    push(vector("llama_plain"), llama, registry=registry, progress=False)
    query = repo_name(request).split("/")[1]
    everything = search(query, registry=registry)
    assert sorted(h.repo_id for h in everything.hits) == sorted([qwen, llama])
    fitting = search(query, base=str(trio("qwen2_plain").target), registry=registry)
    assert [h.repo_id for h in fitting.hits] == [qwen] and fitting.hits[0].fit.fits
    assert "correlation" in (fitting.hits[0].fit.lineage or ""), "the lineage sketch is compared and shown"
    assert fitting.rejected == []  # llama's shape tag is not the target's: its card is never read
    slow = search(query, base=str(trio("qwen2_plain").target), registry=registry, include_untagged=True)
    assert [h.repo_id for h in slow.hits] == [qwen] and (slow.untagged_read, slow.other_shapes_skipped) == (0, 1)


# ------------------------------------------------------------------ Hub faults


def test_a_commit_answered_500_is_retried_once_and_lands_once(request, hub, hub_env, vector):
    repo = repo_name(request)
    push(vector("qwen2_plain"), repo, message="first", progress=False)  # creates the repo
    before = hub.history(repo)
    hub.fail_next_commits(1)
    result = push(vector("qwen2_hard"), repo, progress=False)
    assert result.committed and hub.history(repo) == [result.commit, *before]


def test_a_commit_that_keeps_failing_is_a_clear_error_and_commits_nothing(request, hub, hub_env, vector):
    repo = repo_name(request)
    push(vector("qwen2_plain"), repo, progress=False)
    before = hub.history(repo)
    hub.fail_next_commits(10)
    with pytest.raises(RegistryUnavailableError, match=r"answered 500 \(server error\) on commit; nothing was changed"):
        push(vector("qwen2_hard"), repo, progress=False)
    assert hub.history(repo) == before


def test_a_download_cut_midway_is_resumed(request, hub, hub_env, vector, tmp_path):
    repo = repo_name(request)
    vec = vector("qwen2_wide")
    push(vec, repo, progress=False)
    hub.drop_next_downloads("vector.safetensors", 1, after_bytes=100_000)
    result = pull(repo, out=tmp_path / "vec", progress=False)
    assert (Path(result.path) / "vector.safetensors").read_bytes() == (vec / "vector.safetensors").read_bytes()


def test_a_download_that_keeps_failing_is_a_clear_error_with_no_output(request, hub, hub_env, vector, tmp_path):
    repo = repo_name(request)
    push(vector("qwen2_plain"), repo, progress=False)
    hub.drop_next_downloads("vector.safetensors", 100, after_bytes=0)
    with pytest.raises(RegistryUnavailableError, match="connection to the Hub at .* failed"):
        pull(repo, out=tmp_path / "vec", progress=False)
    assert_no_output(tmp_path / "vec")


def test_tokens_missing_rejected_and_private_repos(request, hub, hub_env, vector, monkeypatch):
    repo = repo_name(request)
    monkeypatch.delenv("HF_TOKEN")
    one_error(invoke("push", vector("qwen2_plain"), repo), "needs a Hugging Face token", "HF_TOKEN")
    assert repo not in hub.repos  # refused before any request
    wrong = "hf_rvhubWRONGtoken000000000000"
    result = invoke("push", vector("qwen2_plain"), repo, env={"HF_TOKEN": wrong})
    assert wrong not in result.output + result.stderr
    one_error(result, "refused the token", "check that it is valid")

    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    push(vector("qwen2_plain"), repo, private=True, progress=False)
    assert hub.repos[repo].private
    one_error(invoke("info", repo, env={"HF_TOKEN": wrong}), "refused the token")
    monkeypatch.delenv("HF_TOKEN")
    one_error(invoke("info", repo), "not found", "private repo that your token may read it")


def test_offline_pull_and_info_work_from_the_cache(request, hub_env, vector, monkeypatch, tmp_path):
    repo = repo_name(request)
    pushed = push(vector("qwen2_plain"), repo, progress=False)
    online = pull(repo, progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = pull(repo, out=tmp_path / "vec", progress=False)
    assert offline.commit == online.commit == pushed.commit
    assert info(repo).commit == pushed.commit
    with pytest.raises(RegistryUnavailableError, match="HF_HUB_OFFLINE=1"):
        pull("rvtest/never-pulled", progress=False)


def test_search_base_reads_a_hub_target_by_its_headers(request, hub, hub_env, vector, trio):
    target = repo_name(request, "-target")
    HfApi().create_repo(target)
    HfApi().upload_folder(folder_path=str(trio("qwen2_plain").target), repo_id=target)
    repo = repo_name(request)
    push(vector("qwen2_plain"), repo, progress=False)
    ranged = hub.requests("GET", f"/{target}/resolve/")
    found = search(repo.split("/")[1], base=target)
    assert [h.repo_id for h in found.hits] == [repo]
    assert hub.requests("GET", f"/{target}/resolve/") > ranged  # config.json and safetensors header only
    weights = [s for m, p, s in hub.log if m == "GET" and p.startswith(f"/{target}/resolve/")
               and p.endswith("/model.safetensors")]
    assert weights and set(weights) == {206}  # the header by Range requests, never the whole file
    with pytest.raises(VectorFormatError, match="no rvhub.json: it is not an rvhub vector"):
        info(target)


# ------------------------------------------------------------------ the CLI's options


def test_pull_options_that_need_apply(hub_env):
    one_error(invoke("pull", "rvtest/x", "--base", "somewhere"), "--base", "add --apply")
    one_error(invoke("pull", "rvtest/x", "--apply", "--base", "somewhere"), "needs --base TARGET and -o OUT")
    with pytest.raises(InvalidOptionError, match="repo id"):
        pull("not-a-repo-id")


def test_registry_environment_variable(request, vector, tmp_path, monkeypatch):
    monkeypatch.setenv("RVHUB_REGISTRY", str(tmp_path / "reg"))
    repo = repo_name(request)
    result = invoke("push", vector("qwen2_plain"), repo, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["registry"] == f"registry folder {tmp_path / 'reg'}"
    assert (tmp_path / "reg" / repo / "refs" / "main").is_file()
    shown = invoke("search")
    assert repo in shown.stdout
    with pytest.raises(RepoNotFoundError):
        info("rvtest/absent")
    with pytest.raises(AuthError):  # an explicit Hub registry still needs a token to push
        from rvhub._hub_registry import HubRegistry

        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        push(vector("qwen2_plain"), repo, registry=HubRegistry("http://127.0.0.1:9"), progress=False)


# ------------------------------------------------------------------ the LoRA form by repo id


_LOAD_BY_REPO_ID = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
target, merged, repo = sys.argv[1:]
ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
def logits(model):
    with torch.no_grad():
        return model(input_ids=ids).logits
def base():
    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
ours = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
rel = lambda m: float((logits(m) - ours).norm() / ours.norm())
hf = base()
hf.load_adapter(repo)
print(json.dumps({"plain": rel(base()), "peft": rel(PeftModel.from_pretrained(base(), repo)), "load_adapter": rel(hf)}))
"""


def test_lora_form_loads_by_repo_id_with_peft_and_transformers(request, hub, hub_env, lowrank, tmp_path):
    """An adapter pushed by rvhub loads by repo id with PeftModel.from_pretrained and model.load_adapter, and
    gives the logits of `rvhub pull --apply` of the same repo. (PEFT calls huggingface_hub's module-level
    functions, bound to the endpoint at import: so this runs in a process started with HF_ENDPOINT.)"""
    import subprocess
    import sys

    from rvhub.compress import compress

    trio, vec = lowrank("llama")
    compress(vec, tmp_path / "ad", rank=2, progress=False)
    repo = repo_name(request)
    push(tmp_path / "ad", repo, progress=False)
    pull_apply(repo, str(trio.target), tmp_path / "out", progress=False)
    before = hub.requests("HEAD", f"/{repo}/resolve/") + hub.requests("GET", f"/{repo}/resolve/")
    done = subprocess.run([sys.executable, "-c", _LOAD_BY_REPO_ID, str(trio.target), str(tmp_path / "out"), repo],
                          env=hub_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert HUB_TOKEN not in done.stdout + done.stderr
    rel = json.loads(done.stdout.strip().splitlines()[-1])
    assert rel["plain"] > 1e-3, "the adapter must move the logits"
    assert rel["peft"] <= 1e-4 and rel["load_adapter"] <= 1e-4
    after = hub.requests("HEAD", f"/{repo}/resolve/") + hub.requests("GET", f"/{repo}/resolve/")
    assert after > before, "PEFT resolved the adapter on the local Hub (the files, pulled already, come from the cache)"

"""A hostile local registry and hostile files (issue 11, the local side).

Each attack is run through the CLI in-process: one clear line on stderr, exit code 1, no traceback, and
nothing written, deleted or read outside what rvhub owns (sentinel files beside the registry stay as they
were, no file appears outside the registry and the output).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import folder_snapshot, load_tensors, run_cli, save_tensors
from markdown_it import MarkdownIt
from typer.testing import CliRunner

from rvhub.card import CARD_FILE, FileEntry, VectorCard
from rvhub.cli import app
from rvhub.errors import RegistryDamagedError, RvhubError, VectorFormatError
from rvhub.registry import info, push

REPO = "org/vec"


@pytest.fixture(autouse=True)
def _keep_signal_handlers(monkeypatch):
    monkeypatch.delenv("RVHUB_DEBUG", raising=False)
    monkeypatch.delenv("RVHUB_REGISTRY", raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


class World:
    """tmp/registry (one pushed repo), tmp/outside (the user's files), and a snapshot of everything."""

    def __init__(self, tmp: Path, vec: Path):
        self.tmp, self.vec = tmp, vec
        self.root = tmp / "registry"
        self.outside = tmp / "outside"
        (self.outside / "victim").mkdir(parents=True)
        (self.outside / "victim" / "f").write_text("the user's file\n")
        (self.outside / "secret").write_text("do not link me\n")
        self.commit = push(vec, REPO, registry=self.root, progress=False).commit
        self.repo = self.root / REPO
        self._before = folder_snapshot(self.outside)

    def snapshot(self) -> Path:
        return self.repo / "snapshots" / self.commit

    def record(self) -> Path:
        return self.repo / "commits" / f"{self.commit}.json"

    def assert_outside_untouched(self, *allowed: Path) -> None:
        """The user's files are as they were, and no file appeared outside the registry and ``allowed``."""
        assert folder_snapshot(self.outside) == self._before
        assert os.stat(self.outside / "secret").st_nlink == 1, "a user's file was hard-linked somewhere"
        owned = [self.root, self.outside, *allowed]
        strays = [p for p in self.tmp.rglob("*") if p.is_file() and not any(o in p.parents for o in owned)]
        assert not strays, strays
        assert not list(self.tmp.rglob("PWNED"))


@pytest.fixture
def world(tmp_path, vector) -> World:
    return World(tmp_path, vector("qwen2_plain"))


def refused(*args: object, fragments: tuple[str, ...] = ()) -> str:
    """Run the CLI in-process: exit code 1, one ``error:`` line on stderr, no traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def reg(world: World) -> tuple[str, str]:
    return ("--registry", str(world.root))


# ------------------------------------------------------------------ refs, records, snapshots, symlinks


def test_a_ref_that_walks_out_of_the_registry_is_refused(world):
    other = world.tmp / "other" / "snapshots" / "X"
    other.mkdir(parents=True)
    for name in os.listdir(world.snapshot()):  # a complete vector outside the registry
        (other / name).write_bytes((world.snapshot() / name).read_bytes())
    (world.repo / "refs" / "main").write_text("../../../other/snapshots/X\n")
    for command in ("info", "pull"):
        refused(command, REPO, *reg(world), fragments=("refs/main", "40-hex-digit commit id", "refused"))
    refused("pull", REPO, "-o", world.tmp / "out", *reg(world), fragments=("refs/main",))
    world.assert_outside_untouched(world.tmp / "other")
    assert not (world.tmp / "out").exists()


def test_symlinked_ref_snapshot_and_card_leaving_the_registry_are_refused(world):
    planted = world.outside / "planted"
    planted.mkdir()
    (planted / "ref").write_text(world.commit + "\n")
    ref = world.repo / "refs" / "main"
    ref.unlink()
    ref.symlink_to(planted / "ref")
    refused("info", REPO, *reg(world), fragments=("outside",))
    ref.unlink()
    ref.write_text(world.commit + "\n")

    snap = world.snapshot()
    moved = planted / "snap"
    snap.rename(moved)
    snap.symlink_to(moved)  # the snapshot folder lives outside
    refused("info", REPO, *reg(world), fragments=("outside",))
    refused("pull", REPO, "-o", world.tmp / "out", *reg(world), fragments=("outside",))
    snap.unlink()
    moved.rename(snap)

    card = snap / CARD_FILE
    (planted / CARD_FILE).write_bytes(card.read_bytes())
    card.unlink()
    card.symlink_to(planted / CARD_FILE)  # one file of the snapshot lives outside
    refused("info", REPO, *reg(world), fragments=("outside",))
    assert not (world.tmp / "out").exists()


def test_a_commit_record_naming_a_path_creates_nothing_outside(world, vector):
    record = json.loads(world.record().read_text())
    record["files"]["../../../../PWNED"] = record["files"][CARD_FILE]
    world.record().write_text(json.dumps(record))
    line = refused("push", vector("qwen2_hard"), REPO, *reg(world), fragments=("commits/", "PWNED"))
    assert "not a plain file name" in line
    refused("info", REPO, *reg(world), fragments=("PWNED",))
    world.assert_outside_untouched()


def test_a_hash_that_is_a_path_never_links_a_users_file(world, vector):
    record = json.loads(world.record().read_text())
    entry = next(k for k in record["files"] if k.endswith(".safetensors"))
    record["files"][entry]["sha256"] = "../../../../outside/secret"
    world.record().write_text(json.dumps(record))
    refused("push", vector("qwen2_hard"), REPO, *reg(world), fragments=("sha256",))
    world.assert_outside_untouched()


def test_a_symlinked_blob_is_not_linked_into_a_snapshot(world, vector):
    record = json.loads(world.record().read_text())
    blob = world.repo / "blobs" / record["files"]["vector.safetensors"]["sha256"]
    blob.unlink()
    blob.symlink_to(world.outside / "secret")
    # a new card with the same tensor file: the new snapshot would hard-link the (symlinked) blob
    card = VectorCard.read(world.vec)
    edited = world.tmp / "edited"
    edited.mkdir()
    for name in os.listdir(world.vec):
        (edited / name).write_bytes((world.vec / name).read_bytes())
    card.model_copy(update={"license": "mit"}).write(edited)
    refused("push", edited, REPO, *reg(world), fragments=("blob", "symlink"))
    world.assert_outside_untouched(edited)


def test_symlinked_lock_and_repo_folders_are_refused(world, vector):
    lock = world.repo / ".lock"
    lock.unlink()
    lock.symlink_to(world.outside / "victim" / "lockfile")  # dangling: opening it would create it outside
    refused("push", vector("qwen2_hard"), REPO, *reg(world), fragments=("lock",))
    assert not (world.outside / "victim" / "lockfile").exists()

    (world.root / "evil").symlink_to(world.outside / "victim")
    refused("push", vector("qwen2_hard"), "evil/vec", *reg(world), fragments=("outside",))
    refused("info", "evil/vec", *reg(world), fragments=("outside",))
    world.assert_outside_untouched()


def test_a_ref_to_a_commit_without_record_is_one_line(world, vector):
    world.record().unlink()
    refused("push", vector("qwen2_hard"), REPO, *reg(world), fragments=("has no record",))
    refused("info", REPO, *reg(world), fragments=("has no record",))


@pytest.mark.parametrize("repo_id", ["org/vec\n", "org/véc", "org/vec/../../x", "../org/vec"])
def test_repo_ids_with_newlines_or_non_ascii_letters_are_refused(world, repo_id):
    refused("info", repo_id, *reg(world), fragments=("repo id",))
    refused("push", world.vec, repo_id, *reg(world), fragments=("repo id",))
    world.assert_outside_untouched()


def test_search_goes_on_past_a_damaged_repo(world, vector):
    push(vector("llama_plain"), "org/other", registry=world.root, progress=False)
    (world.repo / "refs" / "main").write_text("../../x\n")
    result = CliRunner().invoke(app, ["search", "--registry", str(world.root), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert sorted(h["repo_id"] for h in found["hits"]) == ["org/other", REPO]  # without --base: listed only
    with pytest.raises(RegistryDamagedError):
        info(REPO, registry=world.root)


def test_a_push_killed_midway_leaves_temporaries_the_next_push_clears(world, vector):
    blobs = world.repo / "blobs"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [blobs / f".{'a' * 64}.{dead.pid}.tmp", world.repo / "refs" / f".main.{dead.pid}.tmp"]
    for p in stale:
        p.write_bytes(b"half a blob")
    stale_dir = world.repo / "snapshots" / f".{'b' * 40}.rvhub-tmp-{dead.pid}-0a0b0c0d"
    stale_dir.mkdir()
    (stale_dir / "x").write_bytes(b"half")
    live = blobs / f".{'c' * 64}.{os.getpid()}.tmp"  # a push still running: left alone
    live.write_bytes(b"in progress")
    push(vector("qwen2_hard"), REPO, registry=world.root, progress=False)
    assert not any(p.exists() for p in stale) and not stale_dir.exists()
    assert live.exists()


# ------------------------------------------------------------------ bounded cards


def _plant_card(world: World, text: str) -> None:
    card = world.snapshot() / CARD_FILE
    card.unlink()  # a hard link to the blob: replace, do not write through
    card.write_text(text)


@pytest.mark.parametrize("kind", ["deep", "long-field", "huge-card"])
def test_deep_and_huge_cards_are_refused_before_parsing(world, trio, kind):
    clean = json.loads((world.vec / CARD_FILE).read_text())
    if kind == "deep":
        text = json.dumps({**clean, "license": None})[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}"
        expect = "nested more than"
    elif kind == "long-field":
        text = json.dumps({**clean, "model_type": "x" * 2_000_000})
        expect = "JSON string of"
    else:  # the 30 MB field: refused by size before it is read whole
        text = json.dumps({**clean, "model_type": "x" * 30_000_000})
        expect = "allowed"
    _plant_card(world, text)
    for args in (("info", REPO), ("pull", REPO), ("search", "--base", trio("qwen2_plain").target)):
        if args[0] == "search":
            result = CliRunner().invoke(app, [*map(str, args), *reg(world), "--json"])
            assert result.exit_code == 0 and expect in json.dumps(json.loads(result.stdout)["rejected"])
        else:
            refused(*args, *reg(world), fragments=(expect,))
    with pytest.raises(VectorFormatError, match=expect):
        VectorCard.from_readme(f"<!-- rvhub-card\n{text}\n-->\n")


def test_deep_json_elsewhere_is_refused(world, tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in os.listdir(world.vec):
        (sharded / name).write_bytes((world.vec / name).read_bytes())
    (sharded / "vector.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    from rvhub.formats import open_vector

    with pytest.raises(RvhubError, match="nested more than"):
        open_vector(sharded, verify=False)


# ------------------------------------------------------------------ outputs that would touch inputs


def test_outputs_never_replace_or_enter_an_input_or_the_registry(world, trio, vector, tmp_path):
    t = trio("qwen2_plain")
    before = folder_snapshot(world.root)
    refused("pull", REPO, "-o", world.root, "--overwrite", *reg(world), fragments=("is", "registry"))
    refused("pull", REPO, "-o", world.repo / "copy", *reg(world), fragments=("lies inside",))
    refused("pull", REPO, "--apply", "--base", t.target, "-o", world.root / "m", *reg(world),
            fragments=("lies inside",))
    refused("pull", REPO, "--apply", "--base", t.target, "-o", t.target / "merged", *reg(world),
            fragments=("lies inside", str(t.target)))
    refused("apply", world.vec, "--base", t.target, "-o", t.target / "sub", fragments=("lies inside",))
    refused("apply", world.vec, "--base", t.target, "-o", world.vec / "m", fragments=("lies inside",))
    refused("apply", world.vec, "--base", t.target, "-o", t.target.parent, "--overwrite", fragments=("contains",))
    refused("extract", "--from", t.sft, "--to", t.rl, "-o", t.sft / "v", fragments=("lies inside",))
    refused("compress", world.vec, "-o", world.vec / "a", "--rank", "2", fragments=("lies inside",))
    refused("push", world.vec, REPO, "--registry", world.vec / "reg", fragments=("registry",))
    link = tmp_path / "link"
    link.symlink_to(t.target)
    refused("apply", world.vec, "--base", t.target, "-o", link, "--overwrite", fragments=("is",))
    assert folder_snapshot(world.root) == before
    assert not (t.target / "sub").exists() and not (t.target / "merged").exists()


def test_an_output_whose_parent_is_a_file(world, trio, tmp_path):
    (tmp_path / "file").write_text("x")
    t = trio("qwen2_plain")
    for args in (("pull", REPO, *reg(world)), ("apply", world.vec, "--base", t.target)):
        refused(*args, "-o", tmp_path / "file" / "out", fragments=("is a file, not a folder",))
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("size", ["nan", "inf", "1e400", "-inf", "0.5"])
def test_max_shard_size_that_is_not_a_size(world, trio, tmp_path, size):
    t = trio("qwen2_plain")
    refused("apply", world.vec, "--base", t.target, "-o", tmp_path / "o", "--max-shard-size", size,
            fragments=("size",))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ cards shown to people


EVIL_ID = 'x` | <script>alert(1)</script> [click](https://evil) <!-- rvhub-card\n{"schema_version": 1}\n-->'


def test_readme_escapes_every_card_value_and_reads_only_the_final_block(world):
    card = VectorCard.read(world.vec)
    fp = card.fingerprints
    assert fp is not None
    evil = card.model_copy(update={
        "source_from": card.source_from.model_copy(update={"kind": "hub", "id": EVIL_ID, "commit": EVIL_ID}),
        "model_type": "qwen2` | <b>bold</b>",
        "rvhub_version": "<img src=x onerror=alert(1)>",
    })
    readme = evil.to_readme()
    assert VectorCard.from_readme(readme) == evil
    body = readme.rsplit("<!-- rvhub-card\n", 1)[0].split("---\n", 2)[2]  # past the YAML metadata
    html = MarkdownIt("commonmark").enable("table").render(body)
    for raw in ("<script", "<b>", "<img", 'href="https://evil', "<!--"):
        assert raw not in html, raw
    row = html.split("from (θ_from)</td>")[1].split("</tr>")[0]
    assert row.count("<td>") == 1, row  # the id did not add table cells
    assert "base_model" not in readme.split("---\n")[1]  # not a Hub id: not in the metadata either
    planted = readme.replace("## Files", f"<!-- rvhub-card\n{card.model_dump_json()}\n-->\n## Files")
    assert VectorCard.from_readme(planted) == evil  # a planted block earlier in the text is not the card


def test_info_strips_terminal_escapes(world):
    card = VectorCard.read(world.snapshot())
    shown = card.model_copy(update={"model_type": "\x1b]0;owned\x07\x1b[2J\x1b[31mred\u202e\r"})
    _plant_card(world, shown.to_json())
    result = CliRunner().invoke(app, ["info", REPO, *reg(world)])
    assert result.exit_code == 0, result.stderr
    assert "red" in result.stdout
    assert not any(c in result.stdout for c in "\x1b\x07\r\u202e")


# ------------------------------------------------------------------ strict cards, lm-eval scores, decoding


@pytest.mark.parametrize("change,fragment", [
    (lambda c: c.update(schema_version=True), "schema_version True"),
    (lambda c: c.update(schema_version=1.0), "schema_version 1.0"),
    (lambda c: c["tensors"][0].update(shape=[-1, 64]), "greater than or equal to 0"),
    (lambda c: c["tensors"][0].update(changed=3.0), "valid integer"),
    (lambda c: c["tensors"].append(c["tensors"][0]), "appears twice in tensors"),
    (lambda c: c["files"].append(c["files"][0]), "appears twice in files"),
    (lambda c: c["files"][0].update(size=True), "valid integer"),
])
def test_cards_that_are_not_quite_cards(world, change, fragment):
    raw = json.loads((world.vec / CARD_FILE).read_text())
    change(raw)
    with pytest.raises(VectorFormatError, match=fragment.replace("(", r"\(")):
        VectorCard.from_json(json.dumps(raw), "card")


def _lm_eval(path: Path, score: object) -> Path:
    path.write_text(json.dumps({"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": score}}}))
    return path


@pytest.mark.parametrize("bad", [float("nan"), "0.5", None])
def test_an_lm_eval_score_that_is_not_a_number_is_refused(world, tmp_path, bad):
    vec = tmp_path / "vec"
    vec.mkdir()
    for name in os.listdir(world.vec):
        (vec / name).write_bytes((world.vec / name).read_bytes())
    target = _lm_eval(tmp_path / "t.json", 0.5)
    plus = _lm_eval(tmp_path / "p.json", bad)
    before = folder_snapshot(vec)
    refused("card", vec, "--lm-eval-target", target, "--lm-eval-plus", plus,
            fragments=("--lm-eval-plus", "exact_match,strict-match", "not a finite number"))
    refused("card", vec, "--lm-eval-target", plus, "--lm-eval-plus", target, fragments=("--lm-eval-target",))
    assert folder_snapshot(vec) == before


def test_a_mask_of_the_wrong_dtype_with_matching_hashes_is_one_line(world, trio, tmp_path):
    vec = tmp_path / "vec"
    vec.mkdir()
    for name in os.listdir(world.vec):
        (vec / name).write_bytes((world.vec / name).read_bytes())
    tensors = load_tensors(vec)
    key = next(k for k in tensors if k.endswith("::mask"))
    tensors[key] = tensors[key].to(torch.float32)  # same length, another dtype
    save_tensors(vec / "vector.safetensors", tensors)
    card = VectorCard.read(vec)
    files = [FileEntry(path=f.path, size=(vec / f.path).stat().st_size, sha256=_sha(vec / f.path)) for f in card.files]
    card.model_copy(update={"files": files}).write(vec)
    refused("apply", vec, "--base", trio("qwen2_plain").target, "-o", tmp_path / "out", "--force", "-q",
            fragments=(key.removesuffix("::mask"), "stored as F32; the card says U8"))
    assert not (tmp_path / "out").exists()


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_real_process_prints_one_line_for_a_damaged_registry(world):
    (world.repo / "refs" / "main").write_text("../../../etc\n")
    done = run_cli("info", REPO, "--registry", world.root)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1

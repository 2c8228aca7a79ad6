"""A registry in a local folder: the Hub's repo model (branches, commits, ``@rev``) without a server.

Layout, per repo (``ROOT/org/name/``), modelled on the Hugging Face cache::

    repo.json                   {"private": …}
    refs/<branch>               the branch's head commit id
    commits/<commit>.json       parent, message, date and {file: {sha256, size}}
    blobs/<sha256>              file contents, shared by every commit that has them
    snapshots/<commit>/<file>   a ready vector folder (hard links to the blobs, or copies)

Every write is atomic (a temporary sibling, fsynced, renamed); the branch ref moves last, so a crash leaves
the previous head in place. Pushes to one repo are serialised by a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._io import atomic_dir, copy_file, write_text
from .card import CARD_FILE
from .errors import RepoNotFoundError, RevisionNotFoundError, VectorFormatError
from .registry import PushResult, Registry, Upload, VectorRef


class LocalRegistry(Registry):
    """Vector repos in a folder (``--registry PATH`` or RVHUB_REGISTRY)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().absolute()

    @property
    def description(self) -> str:
        return f"registry folder {self.root}"

    def _repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    # -------------------------------------------------------------- reading

    def _resolve(self, repo_id: str, revision: str | None) -> str:
        repo = self._repo(repo_id)
        if not (repo / "refs").is_dir():
            raise RepoNotFoundError(repo_id, self.description)
        rev = revision or "main"
        ref = repo / "refs" / rev
        if ref.is_file():
            return ref.read_text().strip()
        if len(rev) >= 7 and all(c in "0123456789abcdef" for c in rev):
            found = sorted(p.stem for p in (repo / "commits").glob(f"{rev}*.json"))
            if len(found) == 1:
                return found[0]
        branches = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file())
        raise RevisionNotFoundError(repo_id, rev, branches)

    def _commit(self, repo_id: str, commit: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self._repo(repo_id) / "commits" / f"{commit}.json").read_text())
        return data

    def fetch_card(self, ref: VectorRef) -> tuple[Path, str]:
        commit = self._resolve(ref.repo_id, ref.revision)
        folder = self._repo(ref.repo_id) / "snapshots" / commit
        if not (folder / CARD_FILE).is_file():
            raise VectorFormatError(str(ref), f"the repo has no {CARD_FILE}: it is not an rvhub vector")
        return folder, commit

    def fetch(self, repo_id: str, commit: str, names: list[str], progress: bool) -> Path:
        return self._repo(repo_id) / "snapshots" / commit  # verified by the caller; nothing to download

    def list_repos(self, query: str | None, limit: int) -> list[tuple[str, str | None]]:
        if not self.root.is_dir():
            return []
        out: list[tuple[str, str | None]] = []
        for ref in sorted(self.root.glob("*/*/refs/main")):
            repo_id = str(ref.parent.parent.relative_to(self.root))
            if query is None or query.lower() in repo_id.lower():
                out.append((repo_id, ref.read_text().strip()))
        return out[:limit]

    # -------------------------------------------------------------- writing

    def publish(
        self, repo_id: str, uploads: list[Upload], *, private: bool, branch: str, message: str, progress: bool
    ) -> PushResult:
        repo = self._repo(repo_id)
        repo.mkdir(parents=True, exist_ok=True)
        with _locked(repo / ".lock"):
            if not (repo / "repo.json").is_file():
                _atomic_write(repo / "repo.json", json.dumps({"private": private}) + "\n")
            head = self._head(repo, branch)
            old: dict[str, dict[str, Any]] = self._commit(repo_id, head)["files"] if head else {}
            new: dict[str, dict[str, Any]] = {u.name: {"sha256": u.sha256(), "size": u.size} for u in uploads}
            stale = set()
            if CARD_FILE in old:
                previous = json.loads((repo / "blobs" / old[CARD_FILE]["sha256"]).read_bytes())
                stale = {str(f["path"]) for f in previous.get("files", [])} - set(new)
            files = {k: v for k, v in old.items() if k not in stale} | new
            result: dict[str, Any] = dict(
                repo_id=repo_id, branch=branch, files=[u.name for u in uploads], registry=self.description
            )
            if head and files == old:
                if not (repo / "refs" / branch).is_file():  # a new branch at an identical head: just the ref
                    _atomic_write(repo / "refs" / branch, head + "\n")
                return PushResult(commit=head, committed=False, uploaded=[], deleted=[], **result)
            for u in uploads:
                self._store_blob(repo, u, new[u.name]["sha256"])
            record = {"parent": head, "message": message, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "files": dict(sorted(files.items()))}
            commit = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
            with atomic_dir(repo / "snapshots" / commit, overwrite=True) as tmp:
                for name, entry in files.items():
                    _link_or_copy(repo / "blobs" / entry["sha256"], tmp / name)
            _atomic_write(repo / "commits" / f"{commit}.json", json.dumps(record, indent=1) + "\n")
            _atomic_write(repo / "refs" / branch, commit + "\n")  # last: the commit becomes visible
        return PushResult(
            commit=commit, committed=True, uploaded=[n for n in new if old.get(n) != new[n]],
            deleted=sorted(stale & set(old)), **result,
        )

    def _head(self, repo: Path, branch: str) -> str | None:
        """The branch head; a new branch starts from main, like the Hub's."""
        for name in (branch, "main"):
            ref = repo / "refs" / name
            if ref.is_file():
                return ref.read_text().strip()
        return None

    def _store_blob(self, repo: Path, upload: Upload, sha256: str) -> None:
        blob = repo / "blobs" / sha256
        if blob.is_file():
            return
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = blob.with_name(f".{sha256}.{os.getpid()}.tmp")
        if isinstance(upload.source, bytes):
            with open(tmp, "wb") as fh:
                fh.write(upload.source)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            copy_file(upload.source, tmp)
        os.replace(tmp, blob)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        copy_file(src, dst)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_text(tmp, text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

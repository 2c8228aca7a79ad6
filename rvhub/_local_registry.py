"""A registry in a local folder: the Hub's repo model (branches, commits, ``@rev``) without a server.

Layout, per repo (``ROOT/org/name/``), modelled on the Hugging Face cache::

    repo.json                   {"private": …}
    refs/<branch>               the branch's head commit id
    commits/<commit>.json       parent, message, date and {file: {sha256, size}}
    blobs/<sha256>              file contents, shared by every commit that has them
    snapshots/<commit>/<file>   a ready vector folder (hard links to the blobs, or copies)

Every write is atomic (a temporary sibling, fsynced, renamed); the branch ref moves last, so a crash leaves
the previous head in place. Pushes to one repo are serialised by a lock file; a push clears the temporary
files a killed push left.

The folder may be writable by others, so what rvhub reads from it is input, not truth: every branch name,
commit id, file name, size and sha256 read from it passes the rules a card's own values pass (a file name is
a plain name, a hash is 64 hex digits), records are bounded JSON, and a path that resolves outside the
registry (a symlinked repo, ref, record, snapshot, blob or lock file) is refused with
:class:`~rvhub.errors.RegistryDamagedError` before anything is read or written through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ._io import _pid_alive, atomic_dir, copy_file, write_text
from ._untrusted import MAX_CARD_BYTES, read_json
from .card import CARD_FILE, FileEntry, VectorCard
from .errors import (
    InvalidOptionError,
    RegistryDamagedError,
    RegistryUnavailableError,
    RepoNotFoundError,
    RevisionNotFoundError,
    RvhubError,
    VectorFormatError,
)
from .registry import Listed, PushResult, Registry, Upload, VectorRef, check_repo_id, check_revision

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"[0-9a-f]{40}")  # matched in full: `$` would let a trailing newline through
_MAX_RECORD = 4 << 20  # a commit record lists the repo's files: a few hundred bytes each
_MAX_REF = 256
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp$")
_TMP_DIR = re.compile(r"^\.[0-9a-f]{40}\.rvhub-tmp-(?P<pid>[0-9]+)-")


class LocalRegistry(Registry):
    """Vector repos in a folder (``--registry PATH`` or RVHUB_REGISTRY)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().absolute()

    @property
    def description(self) -> str:
        return f"registry folder {self.root}"

    def owned_paths(self) -> list[Path]:
        return [self.root]

    def _repo(self, repo_id: str) -> Path:
        check_repo_id(repo_id)
        return self._inside(repo_id, self.root / repo_id)

    def _inside(self, repo_id: str, path: Path) -> Path:
        """``path`` itself, once it is shown to resolve inside the registry (symlinks followed)."""
        root = self.root.resolve()
        real = path.resolve()
        if real != root and root not in real.parents:
            raise RegistryDamagedError(repo_id, str(path), f"it resolves to {real}, outside {self.root}")
        return path

    def _damaged(self, repo_id: str, path: Path, reason: str) -> RegistryDamagedError:
        return RegistryDamagedError(repo_id, str(path), reason)

    # -------------------------------------------------------------- reading

    def _read_ref(self, repo_id: str, ref: Path) -> str:
        self._inside(repo_id, ref)
        try:
            with open(ref, "rb") as fh:
                raw = fh.read(_MAX_REF + 1)
        except OSError as e:
            raise self._damaged(repo_id, ref, f"cannot read the ref: {e.strerror or e}") from e
        commit = raw.decode("utf-8", "replace").strip()
        if len(raw) > _MAX_REF or not _COMMIT.fullmatch(commit):
            raise self._damaged(repo_id, ref, f"a ref must hold a 40-hex-digit commit id, found {commit[:60]!r}")
        return commit

    def _resolve(self, repo_id: str, revision: str | None) -> str:
        repo = self._repo(repo_id)
        if not (repo / "refs").is_dir():
            raise RepoNotFoundError(repo_id, self.description)
        rev = revision or "main"
        check_revision(rev)
        ref = repo / "refs" / rev
        if ref.is_file() or ref.is_symlink():
            commit = self._read_ref(repo_id, ref)
            self._commit(repo_id, commit)  # a ref to a commit without a valid record is refused here
            return commit
        if len(rev) >= 7 and all(c in "0123456789abcdef" for c in rev):
            stems = (p.name.removesuffix(".json") for p in (repo / "commits").glob(f"{rev}*.json"))
            found = sorted(stem for stem in stems if _COMMIT.fullmatch(stem))
            if len(found) == 1:
                self._commit(repo_id, found[0])
                return found[0]
        branches = sorted(
            name for p in (repo / "refs").rglob("*") if p.is_file()
            if _is_revision(name := str(p.relative_to(repo / "refs")))
        )
        raise RevisionNotFoundError(repo_id, rev, branches)

    def _commit(self, repo_id: str, commit: str) -> dict[str, Any]:
        """The record of ``commit``, checked: a parent that is a commit id, and files whose names, sizes and
        hashes pass the card's rules (:class:`~rvhub.card.FileEntry`)."""
        path = self._repo(repo_id) / "commits" / f"{commit}.json"
        if not _COMMIT.fullmatch(commit):
            raise self._damaged(repo_id, path, f"{commit[:60]!r} is not a commit id (40 hex digits)")
        if not path.is_file():
            raise self._damaged(repo_id, path, f"commit {commit[:12]} has no record")
        self._inside(repo_id, path)
        data = read_json(path, max_bytes=_MAX_RECORD, error=lambda reason: self._damaged(repo_id, path, reason))
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise self._damaged(repo_id, path, "a commit record is a JSON object with a 'files' object")
        parent = data.get("parent")
        if parent is not None and not (isinstance(parent, str) and _COMMIT.fullmatch(parent)):
            raise self._damaged(repo_id, path, f"parent {str(parent)[:60]!r} is not a commit id")
        for name, entry in data["files"].items():
            try:
                if not isinstance(entry, dict) or set(entry) != {"sha256", "size"}:
                    raise ValueError("each file is {sha256, size}")
                FileEntry.model_validate({"path": name, **entry}, strict=True)
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(map(str, err["loc"]))
                got = json.dumps(err.get("input"), default=str)[:60]
                raise self._damaged(repo_id, path, f"file {name[:60]!r}, {field}: {err['msg']} (got {got})") from None
            except ValueError as e:
                raise self._damaged(repo_id, path, f"file {name[:60]!r}: {e}") from None
        return data

    def _snapshot(self, repo_id: str, commit: str, names: list[str]) -> Path:
        """The snapshot folder of ``commit``, with each of ``names`` shown to lie inside the registry."""
        folder = self._inside(repo_id, self._repo(repo_id) / "snapshots" / commit)
        for name in names:
            FileEntry.model_validate({"path": name, "size": 0, "sha256": "0" * 64})  # a plain name
            if (folder / name).is_symlink():
                self._inside(repo_id, folder / name)
        return folder

    def fetch_card(self, ref: VectorRef) -> tuple[Path, str]:
        commit = self._resolve(ref.repo_id, ref.revision)
        folder = self._snapshot(ref.repo_id, commit, [CARD_FILE])
        if not (folder / CARD_FILE).is_file():
            raise VectorFormatError(str(ref), f"the repo has no {CARD_FILE}: it is not an rvhub vector")
        return folder, commit

    def fetch(self, repo_id: str, commit: str, names: list[str], progress: bool) -> Path:
        return self._snapshot(repo_id, commit, names)  # verified by the caller; nothing to download

    def commit_message(self, repo_id: str, commit: str) -> str | None:
        message = self._commit(repo_id, commit).get("message")
        return message if isinstance(message, str) else None

    def list_vectors(self, query: str | None, tags: list[str], limit: int | None, sort: str | None) -> list[Listed]:
        """From the registry's index (``.rvhub/index.json``, see ``_local_index``), not a walk over every repo."""
        from . import _local_index

        return _local_index.list_vectors(self, query, tags, limit, sort)

    # -------------------------------------------------------------- writing

    def publish(
        self, repo_id: str, uploads: list[Upload], *, private: bool, branch: str, message: str, progress: bool
    ) -> PushResult:
        repo = self._repo(repo_id)
        try:
            repo.mkdir(parents=True, exist_ok=True)
            self._inside(repo_id, repo)  # again: a folder on the way may have been a symlink
            for sub in ("refs", "commits", "blobs", "snapshots"):
                self._inside(repo_id, repo / sub)
            with _locked(repo_id, repo / ".lock"):
                _clear_stale(repo, ("", "refs", "commits", "blobs"))
                result = self._publish(repo_id, repo, uploads, private, branch, message)
                if branch == "main":  # what search lists: main heads
                    from . import _local_index

                    _local_index.record(self, repo_id)
                return result
        except RvhubError:
            raise
        except OSError as e:  # e.g. a vector file removed while it was being copied
            where = f": {e.filename}" if e.filename else ""
            raise RegistryUnavailableError(repo_id, "push to", f"{e.strerror or e}{where}") from e

    def _publish(
        self, repo_id: str, repo: Path, uploads: list[Upload], private: bool, branch: str, message: str
    ) -> PushResult:
        if not (repo / "repo.json").is_file():
            _atomic_write(repo / "repo.json", json.dumps({"private": private}) + "\n")
        head = self._head(repo_id, repo, branch)
        old: dict[str, dict[str, Any]] = self._commit(repo_id, head)["files"] if head else {}
        new: dict[str, dict[str, Any]] = {u.name: {"sha256": u.sha256(), "size": u.size} for u in uploads}
        stale: set[str] = set()
        if CARD_FILE in old:
            previous = self._stored_card(repo_id, repo, old[CARD_FILE]["sha256"])
            stale = {f.path for f in previous.files} - set(new)
        files = {k: v for k, v in old.items() if k not in stale} | new
        result: dict[str, Any] = dict(
            repo_id=repo_id, branch=branch, files=[u.name for u in uploads], registry=self.description
        )
        if head and files == old:
            if not (repo / "refs" / branch).is_file():  # a new branch at an identical head: just the ref
                _atomic_write(self._inside(repo_id, repo / "refs" / branch), head + "\n")
            return PushResult(commit=head, committed=False, uploaded=[], deleted=[], **result)
        for u in uploads:
            self._store_blob(repo_id, repo, u, new[u.name]["sha256"], new[u.name]["size"])
        record = {"parent": head, "message": message, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "files": dict(sorted(files.items()))}
        commit = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        with atomic_dir(self._inside(repo_id, repo / "snapshots" / commit), overwrite=True) as tmp:
            for name, entry in files.items():
                blob = self._blob(repo_id, repo, entry["sha256"])
                if not blob.is_file():
                    raise self._damaged(repo_id, blob, f"the blob of {name} in commit {head} is missing")
                _link_or_copy(blob, tmp / name)
        _atomic_write(self._inside(repo_id, repo / "commits" / f"{commit}.json"), json.dumps(record, indent=1) + "\n")
        _atomic_write(self._inside(repo_id, repo / "refs" / branch), commit + "\n")  # last: the commit shows
        return PushResult(
            commit=commit, committed=True, uploaded=[n for n in new if old.get(n) != new[n]],
            deleted=sorted(stale & set(old)), **result,
        )

    def _head(self, repo_id: str, repo: Path, branch: str) -> str | None:
        """The branch head; a new branch starts from main, like the Hub's."""
        for name in (branch, "main"):
            ref = repo / "refs" / name
            if ref.is_file() or ref.is_symlink():
                return self._read_ref(repo_id, ref)
        return None

    def _blob(self, repo_id: str, repo: Path, sha256: str) -> Path:
        """``blobs/<sha256>``: a regular file of the registry, never a symlink (a hard link to it goes into
        a snapshot)."""
        blob = repo / "blobs" / sha256
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise self._damaged(repo_id, blob, f"{sha256[:70]!r} is not a sha256 (64 hex digits)")
        if blob.is_symlink():
            raise self._damaged(repo_id, blob, "a blob is a symlink")
        return blob

    def _stored_card(self, repo_id: str, repo: Path, sha256: str) -> VectorCard:
        blob = self._blob(repo_id, repo, sha256)
        try:
            with open(blob, "rb") as fh:
                text = fh.read(MAX_CARD_BYTES + 1).decode("utf-8")
            return VectorCard.from_json(text, str(blob))
        except (OSError, ValueError, RvhubError) as e:
            raise self._damaged(repo_id, blob, f"the previous commit's card cannot be read ({e})") from e

    def _store_blob(self, repo_id: str, repo: Path, upload: Upload, sha256: str, size: int) -> None:
        blob = self._blob(repo_id, repo, sha256)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(blob)
            if stat.S_ISREG(st.st_mode) and st.st_size == size:
                return  # (pull checks every sha256; a blob of the right size is taken as written by us)
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


def _is_revision(name: str) -> bool:
    try:
        check_revision(name)
    except InvalidOptionError:
        return False
    return True


def _clear_stale(repo: Path, subfolders: tuple[str, ...]) -> None:
    """Remove ``.<name>.<pid>.tmp`` files and ``.<commit>.rvhub-tmp-<pid>-…`` snapshot folders left by a push
    whose process is gone (kill -9)."""
    snapshots = repo / "snapshots"
    if snapshots.is_dir() and not snapshots.is_symlink():
        for p in snapshots.iterdir():
            m = _TMP_DIR.match(p.name)
            if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m["pid"])):
                shutil.rmtree(p, ignore_errors=True)
    for sub in subfolders:
        folder = repo / sub if sub else repo
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            m = _TMP.match(p.name)
            if m and not p.is_dir() and not _pid_alive(int(m["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    logger.info("removed %s, left by an interrupted push", p)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        copy_file(src, dst)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_text(tmp, text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(repo_id: str, path: Path) -> Iterator[None]:
    try:  # O_NOFOLLOW: a lock file planted as a symlink is not opened (nor created through)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise RegistryDamagedError(repo_id, str(path), f"cannot open the lock file: {e.strerror or e}") from e
    with os.fdopen(fd, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

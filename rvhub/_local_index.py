"""The index of a registry folder: what ``search`` reads instead of every repo's card.

``ROOT/.rvhub/index.json`` (a name no repo id can take: an org never starts with '.') holds, per repo, the
``main`` head it was made from, the repo's tags (those its README.md carries, :func:`rvhub._readme.hub_tags`)
and the commit's date; and the modification times of the registry folder and of each org folder, which
change when a repo is created. ``push`` updates the entry of its repo (under the index's lock, written
atomically). ``search`` uses the index when it is fresh: no org folder was added, removed or changed since it
was written, and every repo it lists still has the head it records (checked for the repos listed, a small
file each). Otherwise, or when the file is missing, unreadable, larger than :data:`MAX_INDEX_BYTES`, or holds
anything but well-formed entries (the folder may be writable by others: the index is input, not truth), it is
rebuilt from the repos themselves, reading each card once.

Entries only choose which cards ``search`` reads; the cards are then read and checked as always.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._untrusted import read_json
from .errors import InvalidOptionError, RegistryDamagedError, RvhubError

if TYPE_CHECKING:
    from ._local_registry import LocalRegistry
    from .registry import Listed

logger = logging.getLogger(__name__)

INDEX_DIR = ".rvhub"
INDEX_FILE = "index.json"
INDEX_VERSION = 1
MAX_INDEX_BYTES = 256 << 20  # ~200 bytes a repo: a million repos
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.\-]{0,127}")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
Entry = dict[str, Any]  # {"commit": str | None, "tags": list[str] | None, "last_modified": str | None}


class BadIndex(Exception):
    """The index file cannot be used (the reason says why); it is rebuilt."""


def list_vectors(reg: LocalRegistry, query: str | None, tags: list[str], limit: int | None,
                 sort: str | None) -> list[Listed]:
    """The registry folder's part of :meth:`rvhub.registry.Registry.list_vectors`, from the index."""
    from .registry import Listed

    if sort in ("downloads", "likes"):
        raise InvalidOptionError("--sort", sort, "a registry folder counts no downloads or likes: use last_modified")
    if not reg.root.is_dir():
        return []
    with _locked(reg):
        repos = _load_fresh(reg)
        listed: list[Listed] = []
        changed = False
        for repo_id in _order(repos, sort):
            if query is not None and query.lower() not in repo_id.lower() or not _matches(repos[repo_id], tags):
                continue
            head = _head(reg, repo_id)
            if head is not None and head != repos[repo_id]["commit"]:  # moved by a writer that kept no index
                repos[repo_id] = _entry(reg, repo_id)
                changed = True
                if not _matches(repos[repo_id], tags):
                    continue
            entry = repos[repo_id]
            listed.append(Listed(repo_id, head, tuple(entry["tags"] or ()), None, None, entry["last_modified"]))
            if limit is not None and len(listed) >= limit:
                break
        if changed:
            _write(reg, repos)
    return listed


def _matches(entry: Entry, tags: list[str]) -> bool:
    """Whether the entry carries every tag; a repo whose card cannot be read (no tags) is in a plain listing
    only, so that search can say why it cannot use it."""
    from .registry import VECTOR_TAG

    if entry["tags"] is None:
        return not set(tags) - {VECTOR_TAG}
    return set(tags) <= set(entry["tags"])


def record(reg: LocalRegistry, repo_id: str) -> None:
    """After a push to ``repo_id``'s main branch: its entry, and the folders' times as they are now. Only the
    push's own folders (its org's, and the registry's for a new org) may have changed since the index was
    written; otherwise it is rebuilt."""
    with _locked(reg):
        try:
            repos = _load(reg, fresh=True, pushed_to=repo_id.split("/")[0])
        except BadIndex:  # rebuilt (and this repo with it)
            repos = _rebuild(reg)
        repos[repo_id] = _entry(reg, repo_id)
        _write(reg, repos)


# ------------------------------------------------------------------ reading, checking, rebuilding


def _path(reg: LocalRegistry) -> Path:
    return reg.root / INDEX_DIR / INDEX_FILE


def _load_fresh(reg: LocalRegistry) -> dict[str, Entry]:
    try:
        return _load(reg, fresh=True)
    except BadIndex as e:
        logger.info("rebuilding the index of %s: %s", reg.description, e)
        repos = _rebuild(reg)
        _write(reg, repos)
        return repos


def _load(reg: LocalRegistry, fresh: bool = False, pushed_to: str | None = None) -> dict[str, Entry]:
    path = _path(reg)
    if path.is_symlink() or not path.is_file():
        raise BadIndex("no index file" if not path.is_symlink() else "the index file is a symlink")
    try:
        data = read_json(path, max_bytes=MAX_INDEX_BYTES, error=lambda reason: RegistryDamagedError(
            "(index)", str(path), reason))
    except RvhubError as e:
        raise BadIndex(str(e)) from None
    if not isinstance(data, dict) or set(data) != {"rvhub_index", "folders", "repos"} \
            or data["rvhub_index"] != INDEX_VERSION:
        raise BadIndex(f"not an index of version {INDEX_VERSION}")
    folders, repos = data["folders"], data["repos"]
    if not isinstance(folders, dict) or not all(isinstance(k, str) and type(v) is int for k, v in folders.items()):
        raise BadIndex("'folders' must map names to modification times")
    if fresh:
        now, mine = _folders(reg), {"", pushed_to} if pushed_to is not None else set()
        if any(now.get(k) != folders.get(k) for k in (set(now) | set(folders)) - mine):
            raise BadIndex("repos were added or removed since it was written")
    if not isinstance(repos, dict):
        raise BadIndex("'repos' must be an object")
    for repo_id, entry in repos.items():
        _check_entry(repo_id, entry)
    return repos


def _check_entry(repo_id: str, entry: Any) -> None:
    from .registry import check_repo_id

    try:
        check_repo_id(repo_id)
    except InvalidOptionError:
        raise BadIndex(f"it lists {ascii(repo_id)[:80]}, not a repo id") from None
    if not isinstance(entry, dict) or set(entry) != {"commit", "tags", "last_modified"}:
        raise BadIndex(f"the entry of {repo_id} is not {{commit, tags, last_modified}}")
    commit, tags, date = entry["commit"], entry["tags"], entry["last_modified"]
    if commit is not None and not (isinstance(commit, str) and _COMMIT.fullmatch(commit)):
        raise BadIndex(f"the entry of {repo_id} has a commit that is not 40 hex digits")
    if tags is not None and not (isinstance(tags, list) and len(tags) <= 64
                                 and all(isinstance(t, str) and _TAG.fullmatch(t) for t in tags)):
        raise BadIndex(f"the entry of {repo_id} has tags that are not a list of plain tags")
    if date is not None and not (isinstance(date, str) and _DATE.fullmatch(date)):
        raise BadIndex(f"the entry of {repo_id} has a date that is not YYYY-MM-DDTHH:MM:SSZ")


def _folders(reg: LocalRegistry) -> dict[str, int]:
    """Modification times of the registry folder ("") and of every org folder in it."""
    out = {"": reg.root.stat().st_mtime_ns}
    with os.scandir(reg.root) as it:
        for d in it:
            if not d.name.startswith(".") and d.is_dir(follow_symlinks=False):
                out[d.name] = d.stat(follow_symlinks=False).st_mtime_ns
    return out


def _rebuild(reg: LocalRegistry) -> dict[str, Entry]:
    from .registry import check_repo_id

    repos: dict[str, Entry] = {}
    for ref in sorted(reg.root.glob("*/*/refs/main")):
        repo_id = str(ref.parent.parent.relative_to(reg.root))
        try:
            check_repo_id(repo_id)
        except InvalidOptionError:
            logger.warning("skipped %r in %s: not a repo id", repo_id, reg.description)
            continue
        repos[repo_id] = _entry(reg, repo_id)
    return repos


def _head(reg: LocalRegistry, repo_id: str) -> str | None:
    try:
        return reg._read_ref(repo_id, reg.root / repo_id / "refs" / "main")
    except RegistryDamagedError:
        return None  # reading its card fails with the reason; the search goes on


def _entry(reg: LocalRegistry, repo_id: str) -> Entry:
    """What the index records of one repo, read from the repo itself (its card: every check of fetch_card)."""
    from ._readme import hub_tags
    from .card import VectorCard
    from .registry import VectorRef

    head = _head(reg, repo_id)
    try:
        if head is None:
            raise RegistryDamagedError(repo_id, "refs/main", "unreadable")
        folder, commit = reg.fetch_card(VectorRef(repo_id, head))
        card = VectorCard.read(folder)
        date = reg._commit(repo_id, commit).get("date")
    except RvhubError:
        return {"commit": head, "tags": None, "last_modified": None}
    return {"commit": head, "tags": hub_tags(card),
            "last_modified": date if isinstance(date, str) and _DATE.fullmatch(date) else None}


def _order(repos: dict[str, Entry], sort: str | None) -> list[str]:
    names = sorted(repos)
    if sort == "last_modified":  # newest first, as the Hub sorts; undated last
        names.sort(key=lambda r: repos[r]["last_modified"] or "", reverse=True)
    return names


# ------------------------------------------------------------------ writing


def _write(reg: LocalRegistry, repos: dict[str, Entry]) -> None:
    import json

    from ._io import write_text

    path = _path(reg)
    tmp = path.with_name(f".{INDEX_FILE}.{os.getpid()}.tmp")
    data = {"rvhub_index": INDEX_VERSION, "folders": _folders(reg), "repos": dict(sorted(repos.items()))}
    write_text(tmp, json.dumps(data, separators=(",", ":")) + "\n")
    os.replace(tmp, path)  # replaces a planted symlink itself, never what it points to


@contextlib.contextmanager
def _locked(reg: LocalRegistry) -> Iterator[None]:
    """The index's lock (``.rvhub/index.lock``, never followed if it is a symlink): one writer at a time."""
    folder = reg.root / INDEX_DIR
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise RegistryDamagedError("(index)", str(folder), "the index folder is not a plain folder of the registry")
    folder.mkdir(exist_ok=True)
    from ._local_registry import _locked as lock_file  # the repos' lock: O_NOFOLLOW, flock

    with lock_file("(index)", folder / "index.lock"):
        yield

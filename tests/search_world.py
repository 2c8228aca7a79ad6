"""Hundreds of vector repos on a local Hub server (tests/hub_server.py), written straight into it: what the
search tests and scripts/bench_search.py search.

Each repo holds exactly what ``rvhub push`` would upload for its card (``registry.vector_uploads``): the
vector's files, ``rvhub.json`` and the README.md rendered from it, whose YAML tags the server lists. A
vector "of another shape" is a real vector's card with another ``shape_hash`` (its card is never read by a
search that filters by the target's shape tag; a test that reads it finds a card that does not fit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from hub_server import LFS_MIN_SIZE, LFS_SUFFIXES, Blob, LocalHub

from rvhub.card import VectorCard
from rvhub.registry import vector_uploads

START = datetime(2026, 1, 1)


def put_repo(hub: LocalHub, repo_id: str, files: dict[str, bytes], *, downloads: int = 0, likes: int = 0,
             date: str | None = None) -> str:
    """Create ``repo_id`` in ``hub`` holding ``files`` in one commit, as a push would leave it, without the HTTP
    round trips (for tests that need hundreds of repos); returns the commit id."""
    with hub.lock:
        repo = hub.create_repo(repo_id, private=False)
        repo.downloads, repo.likes = downloads, likes
        blobs = dict(repo.commits[repo.branches["main"]].files)
        for path, data in files.items():
            lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
            blobs[path] = Blob(bytearray(data), hashlib.sha256(data).hexdigest(), lfs=lfs)
        oid = hub._new_commit(repo, repo.branches["main"], blobs, "put_repo")
        if date is not None:
            repo.commits[oid].date = date
        repo.branches["main"] = oid
        return oid


def repo_files(folder: Path, card: VectorCard, repo_id: str) -> dict[str, bytes]:
    """The files a push of ``folder`` with ``card`` as its rvhub.json would publish as ``repo_id``."""
    return {u.name: u.read() for u in vector_uploads(folder, card, repo_id, card_json=card.to_json().encode())}


def with_shape(card: VectorCard, shape_hash: str | None) -> VectorCard:
    """``card`` with another shape hash (None: a card written before rvhub recorded one, so untagged)."""
    fp = card.fingerprints
    assert fp is not None
    arch = fp.architecture.model_copy(update={"shape_hash": shape_hash})
    update: dict[str, object] = {"fingerprints": fp.model_copy(update={"architecture": arch})}
    if shape_hash is None:
        update["schema_version"] = 2
    return VectorCard.from_json(card.model_copy(update=update).to_json(), "with_shape")


@dataclass(frozen=True)
class Kind:
    """Repos of one kind: ``count`` copies of ``folder``'s vector published with ``card``."""

    prefix: str
    folder: Path
    card: VectorCard
    count: int


def fill(hub: LocalHub, kinds: list[Kind], org: str = "many") -> dict[str, list[str]]:
    """Write every kind's repos into ``hub``; each repo gets distinct downloads, likes and date (a permutation
    of its number, so that each sort order is another). Returns the repo ids of each kind, by prefix."""
    made: dict[str, list[str]] = {}
    n = sum(k.count for k in kinds)
    i = 0
    for kind in kinds:
        for j in range(kind.count):
            repo_id = f"{org}/{kind.prefix}-{j:05d}"
            files = repo_files(kind.folder, kind.card, repo_id)
            date = START + timedelta(seconds=(i * 7907 + 5) % n)
            put_repo(hub, repo_id, files, downloads=(i * 7919) % n, likes=(i * 104729 + 13) % n,
                         date=date.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
            made.setdefault(kind.prefix, []).append(repo_id)
            i += 1
    return made

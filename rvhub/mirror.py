"""``rvhub mirror SRC DST``: copy one vector revision from a registry to another, verified end to end.

A location names a registry and a repo: ``[REGISTRY::]org/name[@revision]``, where REGISTRY is ``hub`` (the
Hub at $HF_ENDPOINT or huggingface.co) or a registry folder (what ``--registry`` takes); without it, the default
registry of every command ($RVHUB_REGISTRY if set, else the Hub). SRC's revision is a branch or a commit; DST's
is the branch to commit to (default main).

The source is pulled as ``pull`` does (into the Hugging Face cache for the Hub): every file the card lists is
checked against the card's size and sha256 before anything is written to DST, so a tampered source is refused
and DST left as it was. DST gets the same card (``rvhub.json``, byte for byte), the same files, a README.md
rendered from that card for DST's repo id, and the source commit's message, in one commit; a second mirror of
the same revision finds DST already holding it and makes no commit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .card import VectorCard
from .errors import InvalidOptionError
from .registry import Registry, VectorRef, check_revision, open_registry, pull, vector_uploads

HUB = "hub"
SEPARATOR = "::"


@dataclass(frozen=True)
class MirrorResult:
    """What ``mirror`` copied: the source revision, and the commit DST holds it at (``committed`` is False when
    DST already held exactly these files)."""

    source: str
    source_registry: str
    source_commit: str
    repo_id: str
    branch: str
    registry: str
    commit: str
    committed: bool
    message: str
    files: list[str]
    uploaded: list[str]
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_location(text: str) -> tuple[Registry, VectorRef]:
    """``[hub::|FOLDER::]org/name[@rev]`` as a registry and a reference."""
    where, sep, ref = text.rpartition(SEPARATOR)
    if sep and not where:
        raise InvalidOptionError("location", text, f"give a registry before '{SEPARATOR}': {HUB} or a folder")
    if not sep:
        registry = open_registry(None)
    elif where == HUB:
        from ._hub_registry import HubRegistry

        registry = HubRegistry()
    else:
        registry = open_registry(Path(where))
    return registry, VectorRef.parse(ref)


def mirror(source: str, destination: str, *, private: bool = False, progress: bool = True) -> MirrorResult:
    """Copy the vector at ``source`` to ``destination`` (locations as in :func:`parse_location`), verified,
    keeping its card and commit message; no commit when ``destination`` already holds it."""
    src_reg, src = parse_location(source)
    dst_reg, dst = parse_location(destination)
    branch = dst.revision or "main"
    check_revision(branch)
    pulled = pull(str(src), registry=src_reg, progress=progress)  # every file checked against the card
    folder = Path(pulled.path)
    card = VectorCard.read(folder)
    message = src_reg.commit_message(src.repo_id, pulled.commit) or (
        f"rvhub mirror of {src.repo_id}@{pulled.commit[:12]} from {src_reg.description}"
    )
    uploads = vector_uploads(folder, card, dst.repo_id)
    pushed = dst_reg.publish(dst.repo_id, uploads, private=private, branch=branch, message=message, progress=progress)
    return MirrorResult(
        source=str(src), source_registry=src_reg.description, source_commit=pulled.commit, repo_id=dst.repo_id,
        branch=branch, registry=dst_reg.description, commit=pushed.commit, committed=pushed.committed,
        message=message, files=pushed.files, uploaded=pushed.uploaded, bytes=pulled.bytes,
    )

"""Registries: where vectors are published and found. One interface, two registries.

- the Hugging Face Hub (default; honours HF_ENDPOINT; the token comes from HF_TOKEN or ``hf auth login``,
  resolved by huggingface_hub and never printed), see ``_hub_registry``;
- a local folder (``--registry PATH`` or RVHUB_REGISTRY) with the same repo layout, for air-gapped teams and
  offline demos, see ``_local_registry``.

A vector repo holds the vector folder's files: those the card (``rvhub.json``) lists, the card and
``README.md``. ``push`` checks the card and every file's sha256 before any network call and uploads in one
commit; an identical push makes no commit. ``pull`` fetches the card first, then only the files it lists,
and checks every sha256 against it. Network happens here (and in ``sources``) only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import atomic_dir, check_apart, check_output, copy_file, dtype_code, sha256_file
from .card import CARD_FILE, README_FILE, VectorCard, verify_files
from .errors import DownloadIntegrityError, IntegrityError, InvalidOptionError, RegistryError, VectorFormatError

if TYPE_CHECKING:
    from .apply import ApplyResult
    from .compat import TargetFacts
    from .sources import ModelSource

logger = logging.getLogger(__name__)

VECTOR_TAG = "reasoning-vector"
SORTS = ("downloads", "likes", "last_modified")  # `hf models ls --sort` names; descending, as the Hub sorts
MAX_LISTED = 100_000  # a listing ends here whatever a server keeps sending
CARD_READERS = 8  # cards search reads at once
REGISTRY_ENV = "RVHUB_REGISTRY"
# ASCII only, matched in full (a '$' would let a trailing newline through, '\w' would take any letter)
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_\-.]{0,94}[A-Za-z0-9_])?"  # the Hub's rule: no leading/trailing '-' or '.'
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_REVISION = re.compile(r"[A-Za-z0-9_\-.]{1,255}(/[A-Za-z0-9_\-.]{1,255}){0,15}")


# ------------------------------------------------------------------ references and results


@dataclass(frozen=True)
class VectorRef:
    """``org/name`` or ``org/name@revision`` (a branch or a commit hash)."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, ref: str) -> VectorRef:
        repo_id, at, revision = ref.partition("@")
        check_repo_id(repo_id)
        if at:
            check_revision(revision)
        return cls(repo_id, revision or None)

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise InvalidOptionError(
            "repo id", repo_id, "use org/name: letters, digits, '-', '_', '.', no '--' or '..', at most 96 each"
        )


def check_revision(revision: str) -> None:
    if not _REVISION.fullmatch(revision) or any(p in (".", "..") for p in revision.split("/")):
        raise InvalidOptionError("revision", revision, "use a branch name or a commit hash")


@dataclass(frozen=True)
class PushResult:
    """What ``push`` did: ``committed`` is False when the registry already held exactly these files."""

    repo_id: str
    branch: str
    commit: str
    committed: bool
    files: list[str]
    uploaded: list[str]
    deleted: list[str]
    registry: str
    #: card fields whose local paths were published as their last component only (see rvhub._public)
    scrubbed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PullResult:
    """What ``pull`` fetched and verified, and where it is; with ``--apply``, what ``apply`` wrote."""

    repo_id: str
    revision: str | None
    commit: str
    path: str
    files: list[str]
    bytes: int
    registry: str
    applied: ApplyResult | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, applied=None))
        d["applied"] = self.applied.to_dict() if self.applied else None
        return d


@dataclass(frozen=True)
class VectorInfo:
    """A vector repo's card at one commit."""

    repo_id: str
    commit: str
    registry: str
    card: VectorCard

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "commit": self.commit, "registry": self.registry,
                "card": self.card.model_dump(mode="json")}

    def describe(self) -> list[str]:
        return [f"{self.repo_id} @ {self.commit[:12]} ({self.registry})", *describe_card(self.card)]


@dataclass(frozen=True)
class Fit:
    """Whether a vector can be applied to a target, and why (or why not)."""

    fits: bool
    reason: str
    lineage: str | None = None


@dataclass(frozen=True)
class Listed:
    """A vector repo as a registry's listing shows it (checked by :func:`_listed` before use): the tags, counts
    and date are None where the registry does not say."""

    repo_id: str
    commit: str | None
    tags: tuple[str, ...] | None = None
    downloads: int | None = None
    likes: int | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class SearchHit:
    repo_id: str
    commit: str | None
    card: VectorCard | None = None
    fit: Fit | None = None
    listed: Listed | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "commit": self.commit,
            "format": self.card.format if self.card else None,
            "model_type": self.card.model_type if self.card else None,
            "fit": asdict(self.fit) if self.fit else None,
            "downloads": self.listed.downloads if self.listed else None,
            "likes": self.listed.likes if self.listed else None,
            "last_modified": self.listed.last_modified if self.listed else None,
        }


@dataclass(frozen=True)
class SearchResult:
    registry: str
    query: str | None
    base: str | None
    hits: list[SearchHit]
    rejected: list[SearchHit] = field(default_factory=list)  # with --base: vectors that do not fit
    #: with --base: the tag the listing asked for (rvhub-shape-<the target's shape hash>)
    shape_tag: str | None = None
    #: with --include-untagged: untagged vectors read card by card, and tagged ones of other shapes skipped
    #: unread; None without it (untagged vectors were then not searched at all)
    untagged_read: int | None = None
    other_shapes_skipped: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"registry": self.registry, "query": self.query, "base": self.base,
                "hits": [h.to_dict() for h in self.hits], "rejected": [h.to_dict() for h in self.rejected],
                "shape_tag": self.shape_tag, "untagged_read": self.untagged_read,
                "other_shapes_skipped": self.other_shapes_skipped}


# ------------------------------------------------------------------ the interface


@dataclass(frozen=True)
class Upload:
    """A file to publish: from the vector folder, or generated (bytes)."""

    name: str
    source: Path | bytes

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size

    def sha256(self) -> str:
        if isinstance(self.source, bytes):
            return hashlib.sha256(self.source).hexdigest()
        return sha256_file(self.source)

    def read(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else self.source.read_bytes()


class Registry(ABC):
    """Where vector repos live. Implementations: ``HubRegistry`` and ``LocalRegistry``."""

    @property
    @abstractmethod
    def description(self) -> str:
        """For messages: "the Hub at https://huggingface.co", "registry folder /srv/rv"."""

    @abstractmethod
    def publish(
        self, repo_id: str, uploads: list[Upload], *, private: bool, branch: str, message: str, progress: bool
    ) -> PushResult:
        """Commit ``uploads`` to ``branch`` in one commit, removing files the previous card listed and the new
        one does not; no commit when the branch already holds exactly these files."""

    @abstractmethod
    def fetch_card(self, ref: VectorRef) -> tuple[Path, str]:
        """The folder holding the repo's ``rvhub.json`` at ``ref``, and the commit it resolved to."""

    def read_card(self, ref: VectorRef) -> tuple[VectorCard, str]:
        """The card of ``ref`` and the commit it resolved to, for reading only (a search): registries that can
        read it in one request without caching it override this."""
        card_dir, commit = self.fetch_card(ref)
        return VectorCard.read(card_dir), commit

    @abstractmethod
    def fetch(self, repo_id: str, commit: str, names: list[str], progress: bool) -> Path:
        """A local folder holding ``names`` as of ``commit`` (a cache or the registry's own snapshot)."""

    def owned_paths(self) -> list[Path]:
        """Folders the registry keeps (a registry folder, a cache): no command's output may be, contain or lie
        inside one of them."""
        return []

    #: whether publishing writes into :meth:`owned_paths` (a local registry's blobs and snapshots), so that a
    #: folder being pushed must lie apart from them; the Hub's push only reads the folder
    publish_writes_owned = True

    def discard(self, folder: Path, names: list[str]) -> None:  # noqa: B027 (most registries keep no cache)
        """Forget damaged copies of ``names`` in ``folder`` (a cache), so that the next pull fetches them again."""

    def list_repos(self, query: str | None, limit: int) -> list[tuple[str, str | None]]:
        """(repo id, commit) of the vector repos whose id contains ``query``."""
        return [(x.repo_id, x.commit) for x in self.list_vectors(query, [VECTOR_TAG], limit, None)]

    @abstractmethod
    def list_vectors(self, query: str | None, tags: list[str], limit: int | None, sort: str | None) -> list[Listed]:
        """The vector repos whose id contains ``query`` and that carry every tag in ``tags`` (``VECTOR_TAG``
        among them), in one (paged) listing: sorted by ``sort`` (one of :data:`SORTS`, largest or newest
        first; None: the registry's own order), at most ``limit`` (None: all)."""

    def commit_message(self, repo_id: str, commit: str) -> str | None:
        """The message of ``commit`` (its title, a blank line and its description, if it has one); None where the
        registry keeps no messages."""
        return None


def open_registry(registry: str | Path | Registry | None = None) -> Registry:
    """A registry folder (``registry``, else the RVHUB_REGISTRY variable) or, without either, the Hub."""
    if isinstance(registry, Registry):
        return registry
    location = registry if registry is not None else os.environ.get(REGISTRY_ENV) or None
    if location is None:
        from ._hub_registry import HubRegistry

        return HubRegistry()
    from ._local_registry import LocalRegistry

    return LocalRegistry(Path(location))


# ------------------------------------------------------------------ the commands


def push(
    folder: str | Path,
    repo_id: str,
    *,
    registry: str | Path | Registry | None = None,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    progress: bool = True,
    keep_local_paths: bool = False,
) -> PushResult:
    """Publish a vector folder as ``repo_id`` (created if needed) in one commit on ``revision`` (a branch).

    The card and every file's size and sha256 are checked first, before any network call. Local folder paths
    in the card are published as their last component (a local model keeps its content sha256), unless
    ``keep_local_paths``; the folder itself keeps them (see ``rvhub._public``).
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    branch = revision or "main"
    check_revision(branch)
    card = VectorCard.read(folder)
    verify_files(folder, card)
    scrubbed: list[str] = []
    if not keep_local_paths:
        from ._public import public_card

        card, scrubbed = public_card(card)
    uploads = vector_uploads(folder, card, repo_id, card_json=card.to_json().encode() if scrubbed else None)
    reg = open_registry(registry)
    for kept in reg.owned_paths() if reg.publish_writes_owned else []:  # the registry is this command's output
        check_apart(kept, [folder], what="registry")
    text = message or f"rvhub push: {card.format} vector, {len(card.tensors)} tensors"
    result = reg.publish(repo_id, uploads, private=private, branch=branch, message=text, progress=progress)
    return replace(result, scrubbed=scrubbed)


def vector_uploads(folder: Path, card: VectorCard, repo_id: str, card_json: bytes | None = None) -> list[Upload]:
    """The files of a vector repo: what the card lists, the card itself (the folder's, or ``card_json``), and
    README.md rendered from the card for this repo id (so its how-to names the repo; the folder's own
    README.md has a placeholder)."""
    names = [e.path for e in card.files if e.path not in (CARD_FILE, README_FILE)]
    card_file = Upload(CARD_FILE, card_json if card_json is not None else folder / CARD_FILE)
    uploads = [Upload(n, folder / n) for n in names] + [card_file]
    uploads.append(Upload(README_FILE, card.to_readme(repo_id=repo_id).encode()))
    return uploads


def pull(
    ref: str,
    *,
    registry: str | Path | Registry | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PullResult:
    """Fetch a vector (``org/name[@rev]``) and verify every file's sha256 against its card.

    Without ``out`` the vector stays where the registry keeps it (the Hugging Face cache for the Hub) and
    its path is returned; with ``out`` it is copied there atomically (verified again after copying).
    """
    vref = VectorRef.parse(ref)
    reg = open_registry(registry)
    if out is not None:
        check_output(Path(out), overwrite, reg.owned_paths())
    card_dir, commit = reg.fetch_card(vref)
    card = VectorCard.read(card_dir)
    names = [CARD_FILE, *(e.path for e in card.files if e.path != CARD_FILE)]
    folder = reg.fetch(vref.repo_id, commit, names, progress)
    try:
        verify_files(folder, card)
    except IntegrityError as e:
        name = Path(e.path).name
        missing = not (folder / name).exists()
        reg.discard(folder, names)
        raise DownloadIntegrityError(f"{vref.repo_id}@{commit[:12]}", name, reg.description, missing) from e
    path = folder
    if out is not None:
        with atomic_dir(Path(out), overwrite) as tmp:
            for name in names:
                copy_file(folder / name, tmp / name)
            verify_files(tmp, card)
        path = Path(out)
    return PullResult(
        repo_id=vref.repo_id, revision=vref.revision, commit=commit, path=str(path), files=names,
        bytes=sum(e.size for e in card.files), registry=reg.description,
    )


def pull_apply(
    ref: str,
    base: str,
    out: str | Path,
    *,
    registry: str | Path | Registry | None = None,
    scale: float = 1.0,
    dtype: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_vocab_mismatch: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    scale_patterns: Iterable[str] | None = None,
) -> PullResult:
    """``pull`` then ``apply``: write θ_base + scale·v to ``out``. Options are checked before any download.

    The compatibility check runs inside ``apply``.
    """
    from .algebra import ScalePatterns
    from .apply import apply, resolve_device

    reg = open_registry(registry)
    check_output(Path(out), overwrite, [*reg.owned_paths(), *([Path(base)] if Path(base).exists() else [])])
    patterns = ScalePatterns.of(scale_patterns, scale)  # a bad pattern is refused before any download
    resolve_device(device)
    if dtype is not None:
        dtype_code(dtype)
    pulled = pull(ref, registry=reg, progress=progress)
    applied = apply(
        pulled.path, base, out, scale=scale, dtype=dtype, device=device, overwrite=overwrite,
        allow_vocab_mismatch=allow_vocab_mismatch, max_shard_size=max_shard_size, progress=progress,
        scale_patterns=patterns,
    )
    return replace(pulled, applied=applied)


def info(ref: str, *, registry: str | Path | Registry | None = None) -> VectorInfo:
    """A vector repo's card, reading ``rvhub.json`` only."""
    vref = VectorRef.parse(ref)
    reg = open_registry(registry)
    card_dir, commit = reg.fetch_card(vref)
    return VectorInfo(vref.repo_id, commit, reg.description, VectorCard.read(card_dir))


def search(
    query: str | None = None,
    base: str | None = None,
    *,
    registry: str | Path | Registry | None = None,
    limit: int = 50,
    sort: str | None = None,
    include_untagged: bool = False,
) -> SearchResult:
    """Vector repos whose id contains ``query``, sorted by ``sort`` (downloads, likes or last_modified, largest
    or newest first), at most ``limit``.

    With ``base``: only those that pass ``rvhub check`` against it (architecture, config and tokenizer
    fingerprints; the lineage correlation is shown where the card has a sketch). The registry is asked once
    (one paged listing) for the vectors tagged with the target's shape hash, ``rvhub-shape-<16 hex>``, and only
    their cards are read: the requests grow with the matches, not with the registry. ``include_untagged``
    also reads, card by card, every vector that has no shape tag (pushed before rvhub wrote them), skipping
    unread those tagged with another shape. A Hub base is read by its headers and a few byte ranges, never
    downloaded."""
    if limit < 1:
        raise InvalidOptionError("--limit", limit, "must be at least 1")
    if sort is not None and sort not in SORTS:
        raise InvalidOptionError("--sort", sort, f"use one of {', '.join(SORTS)}")
    reg = open_registry(registry)
    if base is None:
        found, bad = _listed(reg.list_vectors(query, [VECTOR_TAG], limit, sort), reg.description)
        return SearchResult(reg.description, query, None, found, bad)
    from ._readme import SHAPE_TAG_PREFIX, shape_tag
    from .compat import TargetFacts, open_target, shape_hash

    target = open_target(base)
    facts = TargetFacts(target)  # its tokenizer and sampled weights, read once for all the cards
    tag = shape_tag(shape_hash(target))
    found, bad = _listed(reg.list_vectors(query, [VECTOR_TAG, tag], limit, sort), reg.description)
    untagged_read: int | None = None
    other_shapes: int | None = None
    if include_untagged:  # the slow path: one listing of every vector, and the cards of the untagged ones
        seen = {h.repo_id for h in found}
        everything, bad_too = _listed(reg.list_vectors(query, [VECTOR_TAG], MAX_LISTED, sort), reg.description)
        known = {x.repo_id for x in bad}
        bad += [b for b in bad_too if b.repo_id not in known]
        untagged_read = other_shapes = 0
        for hit in everything:
            tags = hit.listed.tags if hit.listed else None
            if hit.repo_id in seen:
                continue
            if tags is not None and any(t.startswith(SHAPE_TAG_PREFIX) for t in tags):
                other_shapes += 1  # its own shape tag is not the target's: its card cannot fit
                continue
            untagged_read += 1
            found.append(hit)
    hits: list[SearchHit] = []
    rejected: list[SearchHit] = list(bad)
    for hit, read in zip(found, _read_cards(reg, found), strict=True):
        if isinstance(read, str):  # one unreadable repo does not end the search
            rejected.append(replace(hit, fit=Fit(False, read)))
            continue
        card, commit = read
        fit = fit_to_base(card, target, facts)  # the real check: a listing (or a tag) may lie
        (hits if fit.fits else rejected).append(replace(hit, commit=commit, card=card, fit=fit))
    return SearchResult(reg.description, query, base, hits[:limit], rejected, shape_tag=tag,
                        untagged_read=untagged_read, other_shapes_skipped=other_shapes)


def _read_cards(reg: Registry, hits: list[SearchHit]) -> list[tuple[VectorCard, str] | str]:
    """Each hit's card and the commit it resolved to (or why it cannot be read), :data:`CARD_READERS` at a
    time: on the Hub each card is a round trip, and the matches' cards do not depend on each other."""
    from concurrent.futures import ThreadPoolExecutor

    def read(hit: SearchHit) -> tuple[VectorCard, str] | str:
        try:
            return reg.read_card(VectorRef(hit.repo_id, hit.commit))
        except (VectorFormatError, RegistryError) as e:
            return str(e)

    if len(hits) <= 1:
        return [read(h) for h in hits]
    with ThreadPoolExecutor(max_workers=min(CARD_READERS, len(hits)), thread_name_prefix="rvhub-card") as pool:
        return list(pool.map(read, hits))


def _listed(repos: list[Listed], where: str) -> tuple[list[SearchHit], list[SearchHit]]:
    """The registry's list split into usable hits and those whose id or commit is not one (shown escaped):
    one bad entry from a server does not end the search."""
    good: list[SearchHit] = []
    bad: list[SearchHit] = []
    for entry in repos:
        repo_id, commit = entry.repo_id, entry.commit
        try:
            check_repo_id(repo_id)
            if commit is not None and not re.fullmatch(r"[0-9a-f]{40}", commit):
                raise InvalidOptionError("commit", commit, "a 40-digit hex sha1")
        except InvalidOptionError as e:
            shown = ascii(repo_id)[1:-1][:200]
            bad.append(SearchHit(shown, None, fit=Fit(False, f"{where} listed an invalid {e.option} "
                                                             f"{ascii(e.value)[:80]}; skipped")))
            continue
        good.append(SearchHit(repo_id, commit, listed=entry))
    return good, bad


# ------------------------------------------------------------------ fit and description


def fit_to_base(card: VectorCard, target: ModelSource, facts: TargetFacts | None = None) -> Fit:
    """Whether the vector described by ``card`` fits ``target``: the checks of ``rvhub check`` (``facts``: what
    was read of ``target`` for the cards checked before)."""
    from .compat import check_model

    report = check_model(card, target, facts=facts)
    failed = report.failures()
    reason = "; ".join(f"{c.name}: {c.summary}" for c in failed) if failed else "; ".join(
        f"{c.name} {c.status}" for c in report.checks
    )
    lineage = next((c.summary for c in report.checks if c.name == "lineage"), None)
    return Fit(report.ok, reason, lineage)


def describe_card(card: VectorCard) -> list[str]:
    """The card in a few lines: sources, form and quality, recommended bases and α, benchmark deltas, files."""
    changed = sum(t.changed for t in card.tensors)
    dtypes = "the models' own dtype" if card.values_dtype == "source" else card.values_dtype
    lines = [
        f"  v = to − from; from: {card.source_from}",
        f"                 to:   {card.source_to}",
        f"  model: {card.model_type or 'unknown type'}, {'tied' if card.tie_word_embeddings else 'untied'} embeddings",
        f"  form: {card.format}, {'exact' if card.exact else 'lossy'}, deltas in {dtypes}; "
        f"{len(card.tensors)} tensors changed ({changed:,} elements), {len(card.unchanged)} unchanged",
    ]
    p = card.provenance
    if p is not None:  # a combination: its own formula, not v1's to − from
        lines[0:2] = [f"  v = {p.expression} ({p.method}); inputs: "
                      + ", ".join(f"v{i + 1} = {x.ref}" for i, x in enumerate(p.inputs))]
    c = card.compression
    if c is not None:
        lines.append(
            f"  lora: adapter keeps {100 * c.adapter_energy:.1f}% of ‖v‖², residual {100 * c.residual_energy:.1f}%, "
            f"dropped {100 * c.dropped_energy:.1f}%, relative error {c.rel_error:.3g}"
        )
    bases = ", ".join(card.recommended_bases) or "none given"
    lines.append(f"  recommended: α = {card.recommended_scale:g} on {bases}")
    for b in card.benchmarks:
        sc = b.scores
        delta = f"{b.benchmark} {b.metric} on {b.target}: {sc.target:.4g} → {sc.plus:.4g} with +{b.scale:g}·v"
        if sc.minus is not None:
            delta += f", {sc.minus:.4g} with −{b.scale:g}·v"
        delta += f", control {sc.control:.4g}" if sc.control is not None else " (no random-vector control)"
        lines.append(f"  {delta}" + (f", n={b.n}" if b.n else ""))
    files = ", ".join(f"{e.path} ({e.size / 1e6:,.2f} MB)" for e in card.files)
    lines.append(f"  files: {files}")
    return lines

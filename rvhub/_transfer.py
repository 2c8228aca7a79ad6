"""Resumable, verified downloads of a vector's files from a Hub-compatible server into the Hugging Face cache.

huggingface_hub 2.4 resumes a cut download within one call only from whole 10 MB chunks (so a cut before
10 MB restarts the file), and removes its partial file when the call fails. rvhub's downloader keeps every
byte that arrived:

- it streams each file into ``blobs/<etag>.incomplete`` in the repo's cache folder, under huggingface_hub's own
  lock for that blob (``.locks/<repo folder>/<etag>.lock``), so an ``hf_hub_download`` of the same file waits;
- a cut connection is retried at once with ``Range: bytes=<kept>-``, as long as each try brings new bytes;
  a call that gives up leaves the partial file, and the next call resumes from it;
- a Range answer must be a 206 whose ``Content-Range`` starts where the partial file ends and ends at the
  size the card declares, with the ETag and commit of the HEAD answer (when it comes from the server itself,
  not a CDN it redirects to); a 200 (the server ignored the Range) restarts the file from its first byte;
  anything else is refused as hostile and the partial file is removed;
- the whole file's size and sha256 must equal the card's before the partial file becomes the cached blob
  (renamed in place) and ``snapshots/<commit>/<name>`` links to it, as huggingface_hub lays the cache out.

It runs on huggingface_hub's own HTTP client (``get_session()``), so every answer passes rvhub's hostile-server
checks (``_hub_guard``): ETags and commits in hex, no compression, at most the declared size per answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx2
from huggingface_hub import constants, get_hf_file_metadata, get_session, hf_hub_url
from huggingface_hub.utils._fixes import WeakFileLock
from huggingface_hub.utils._headers import build_hf_headers
from huggingface_hub.utils._http import hf_raise_for_status
from huggingface_hub.utils.tqdm import tqdm as _hf_tqdm

from . import _hub_guard as guard
from ._io import check_stop
from .errors import HostileServerError

logger = logging.getLogger(__name__)

STALLED_TRIES = 5  # a download is given up after this many tries in a row that bring no new byte
RETRY_WAIT_S = 0.2  # times the number of tries in a row without progress
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20})")


class Mismatch(Exception):
    """The downloaded bytes do not have the card's size and sha256 (the partial file was removed)."""


def partial_path(repo_id: str, etag: str) -> Path:
    """Where the bytes of a download that has not finished are kept."""
    return guard.repo_cache(repo_id) / "blobs" / f"{etag}.incomplete"


def download(
    repo_id: str, name: str, commit: str, *, size: int, sha256: str, endpoint: str, token: str | None, progress: bool,
) -> Path:
    """``snapshots/<commit>/<name>`` in the repo's cache folder, holding exactly ``size`` bytes whose sha256 is
    ``sha256`` (downloaded, or resumed from a partial file, if not there yet). :class:`Mismatch` when the
    server's bytes are not those; :class:`HostileServerError` for an answer rvhub refuses."""
    root = guard.repo_cache(repo_id)
    where = f"the server at {endpoint}"
    link = root / "snapshots" / commit / name
    if link.is_file():  # a previous pull (rvhub's or huggingface_hub's); the caller verifies it
        guard.contained(link, root, repo_id, f"the cached {name}")
        return link
    url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(token=token)
    with guard.bounded(repo_id, name, size, declared=True):
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=True)
    etag = meta.etag or ""
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", etag):
        raise HostileServerError(repo_id, where, f"sent no usable ETag for {name} ({ascii(etag)[:80]})")
    if meta.commit_hash is not None and meta.commit_hash != commit:
        raise HostileServerError(repo_id, where, f"answered for {name} at commit {meta.commit_hash[:12]}, "
                                 f"not the {commit[:12]} asked for")
    if meta.size is not None and meta.size != size:
        raise HostileServerError(repo_id, where, f"sent a file of another size than it declared ({name}: "
                                 f"{meta.size:,} bytes, the card says {size:,})")
    if len(etag) == 64 and etag != sha256:  # an LFS file's ETag is its sha256
        raise Mismatch(name)
    blob = root / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    guard.contained(blob.parent, root, repo_id, f"the blob folder of {name}")
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / root.name / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not blob.is_file():
            _fetch(_Job(repo_id, name, commit, etag, size, sha256, url, headers, where), progress)
        guard.contained(blob, root / "blobs", repo_id, f"the cached {name}")
        if blob.stat().st_size != size:  # a blob of another file (a lying ETag) is not linked as this one
            raise HostileServerError(repo_id, where, f"sent the ETag {etag} for {name}, which names a cached "
                                     f"file of {blob.stat().st_size:,} bytes, not the card's {size:,}")
        link.parent.mkdir(parents=True, exist_ok=True)
        guard.contained(link.parent, root, repo_id, f"the snapshot folder of {name}")
        _link(blob, link)
    return link


class _Job:
    def __init__(self, repo_id: str, name: str, commit: str, etag: str, size: int, sha256: str, url: str,
                 headers: dict[str, str], where: str) -> None:
        self.repo_id, self.name, self.commit, self.etag = repo_id, name, commit, etag
        self.size, self.sha256, self.url, self.headers, self.where = size, sha256, url, headers, where
        self.partial = partial_path(repo_id, etag)
        self.blob = self.partial.with_name(etag)
        self.hasher: Any = hashlib.sha256()

    def hostile(self, reason: str) -> HostileServerError:
        return HostileServerError(self.repo_id, self.where, f"sent {reason}")


def _fetch(job: _Job, progress: bool) -> None:
    """Fill (or resume) the partial file to the declared size, check it, and rename it to the blob. A resumed
    file that does not check out is fetched once more from its first byte (the partial file may be damaged)."""
    for attempt in (1, 2):
        try:  # O_NOFOLLOW: a partial file planted as a symlink is not written through
            fd = os.open(job.partial, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if not job.partial.is_symlink():
                raise
            raise HostileServerError(job.repo_id, "the Hugging Face cache", f"holds the partial file "
                                     f"{job.partial.name} as a symlink: not followed") from e
        with os.fdopen(fd, "ab+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > job.size:  # not ours to trust: start again
                fh.truncate(0)
            resumed = fh.tell() > 0
            job.hasher = _hash_of(fh)
            with _bar(job, fh.tell(), progress) as bar:
                try:
                    _fill(job, fh, bar)
                except HostileServerError:
                    _remove(job.partial)
                    raise
            fh.flush()
            os.fsync(fh.fileno())
            got = fh.tell()
        if got == job.size and job.hasher.hexdigest() == job.sha256:
            os.replace(job.partial, job.blob)
            return
        _remove(job.partial)
        if not resumed or attempt == 2:
            raise Mismatch(job.name)
        logger.warning("the resumed download of %s does not match its card; downloading it again", job.name)


def _fill(job: _Job, fh: BinaryIO, bar: Any) -> None:
    """Append the missing bytes, retrying a cut connection from where it stopped."""
    stalled = 0
    best = fh.tell()
    while fh.tell() < job.size:
        try:
            _get(job, fh, bar)
        except httpx2.TransportError as e:
            if fh.tell() > best:
                best, stalled = fh.tell(), 0
            stalled += 1
            if stalled >= STALLED_TRIES:
                raise
            logger.warning("download of %s cut at byte %s of %s (%s); resuming", job.name, f"{fh.tell():,}",
                           f"{job.size:,}", type(e).__name__)
            time.sleep(RETRY_WAIT_S * stalled)


def _get(job: _Job, fh: BinaryIO, bar: Any) -> None:
    """One GET: from the start, or a Range from the end of the partial file."""
    offset = fh.tell()
    headers = {**job.headers, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with guard.bounded(job.repo_id, job.name, job.size, declared=True), get_session().stream(
        "GET", job.url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
    ) as response:
        hf_raise_for_status(response)
        _check_answer(job, response, offset)
        if offset and response.status_code == 200:  # the server ignored the Range: it sends the whole file
            logger.warning("%s ignored the Range request for %s; downloading it from the start", job.where, job.name)
            fh.seek(0)
            fh.truncate(0)
            job.hasher = hashlib.sha256()
            bar.reset(total=job.size)
            offset = 0
        for chunk in response.iter_raw():
            if fh.tell() + len(chunk) > job.size:
                raise job.hostile(f"more than the declared {job.size:,} bytes for {job.name}")
            fh.write(chunk)
            job.hasher.update(chunk)
            bar.update(len(chunk))
            check_stop()  # Ctrl-C: the bytes so far stay in the partial file for the next call
    if fh.tell() != job.size:  # a body that ended early without a transport error
        raise job.hostile(f"a file of another size than it declared ({job.name}: {fh.tell():,} of {job.size:,} bytes)")


def _check_answer(job: _Job, response: Any, offset: int) -> None:
    headers = response.headers
    if not response.history:  # from the server itself (a CDN it redirects to has ETags of its own)
        etag = headers.get("X-Linked-Etag") or headers.get("ETag")
        if etag is not None and guard._unquote(etag) != job.etag:
            raise job.hostile(f"{job.name} with ETag {ascii(etag)[:80]}, not the {job.etag} it announced")
        commit = headers.get("X-Repo-Commit")
        if commit is not None and commit != job.commit:
            raise job.hostile(f"{job.name} at commit {ascii(commit)[:50]}, not {job.commit[:12]}")
    length = headers.get("Content-Length")
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
        if not offset or match is None or (int(match[1]), int(match[2]), int(match[3])) != (
            offset, job.size - 1, job.size
        ):
            raise job.hostile(f"bytes {ascii(headers.get('Content-Range'))[:80]} of {job.name} in answer to a "
                              f"request for bytes {offset}-{job.size - 1} of {job.size}")
        expected = job.size - offset
    elif response.status_code == 200:
        expected = job.size
    else:
        raise job.hostile(f"status {response.status_code} for {job.name}, neither 200 nor 206")
    if length is not None and int(length) != expected:
        raise job.hostile(f"a file of another size than it declared ({job.name}: Content-Length {int(length):,}, "
                          f"expected {expected:,})")


def _hash_of(fh: BinaryIO) -> Any:
    """sha256 of what the partial file already holds (read back: the resumed file is hashed whole)."""
    end = fh.tell()
    fh.seek(0)
    hasher = hashlib.sha256()
    while fh.tell() < end:
        hasher.update(fh.read(min(_CHUNK, end - fh.tell())))
    return hasher


@contextlib.contextmanager
def _bar(job: _Job, initial: int, progress: bool) -> Iterator[Any]:
    bar = _hf_tqdm(  # type: ignore[no-untyped-call]
        total=job.size, initial=initial, desc=job.name, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not progress, leave=False, dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


def _link(blob: Path, link: Path) -> None:
    """``snapshots/<commit>/<name>`` -> ``../../blobs/<etag>``, relative as huggingface_hub makes it (a copy
    where the file system has no symlinks)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        os.symlink(os.path.relpath(blob, link.parent), tmp)
    except OSError:
        import shutil

        shutil.copyfile(blob, tmp)
    os.replace(tmp, link)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

"""What rvhub accepts from a Hub-compatible server before huggingface_hub acts on it.

huggingface_hub names cache files after what the server sends: blobs after the ``ETag``/``X-Linked-Etag``
header, snapshot folders after ``X-Repo-Commit``, and it downloads whatever body comes. A lying server can
aim those paths outside the cache (``X-Linked-Etag: "../../victim"``) or send an endless body. rvhub does not
rely on the library to have fixed that; two guards stand between them:

1. A response hook on huggingface_hub's own HTTP client (``get_session()``), so it sees the very response the
   library is about to use (a separate HEAD first would leave a window for the server to answer differently):
   ETags must be a git sha1 or a sha256 in hex, commits a sha1, sizes plain integers; inside :func:`bounded`,
   a body may not declare or send more than the limit (the size the card declares, for a vector file).
   Compression is refused there (``Accept-Encoding: identity`` is asked), so bytes counted are bytes written.
2. :func:`contained`: every path rvhub reads, or deletes, in the cache is resolved and must lie inside the
   folder of that repo in the cache before it is touched; symlinks that leave it are refused.

The files a card lists are downloaded by rvhub's resumable downloader (``_transfer``), which runs on that same
client, so these checks apply to it too; it keeps the Hugging Face cache layout, so ``HF_HUB_OFFLINE=1`` works
from what was pulled before, and CDN redirects keep working. Cards, model files and headers go through the
library's own downloader.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from ._secrets import scrub_logging
from ._untrusted import MAX_CARD_BYTES as MAX_CARD_BYTES  # rvhub.json (and a previous card read on push)
from ._untrusted import MAX_JSON_BYTES, read_json
from .errors import HostileServerError, RvhubError

SHA1 = re.compile(r"[0-9a-f]{40}")
_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]{1,20}")

MAX_SIDE_FILE_BYTES = 256 << 20  # config.json, tokenizer files of a model
MAX_API_BYTES = 64 << 20  # any JSON answer (model info, tree, model list)
SAFETENSORS_HEADER_BYTES = 25_000_000 + 8  # the largest header get_safetensors_metadata reads, and its length


@dataclass(frozen=True)
class _Scope:
    repo_id: str
    what: str
    limit: int
    declared: bool  # the limit is a size declared for this file (by the card or the listing)


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("rvhub_hub_scope", default=None)


@contextlib.contextmanager
def bounded(repo_id: str, what: str, limit: int, *, declared: bool = False) -> Iterator[None]:
    """Within this block, every answer huggingface_hub reads in this thread carries at most ``limit`` bytes.

    ``declared``: ``limit`` is the size declared for the file ``what`` (the message then says so).
    """
    install()
    token = _scope.set(_Scope(repo_id, what, limit, declared))
    try:
        yield
    finally:
        _scope.reset(token)


def current() -> _Scope | None:
    """The limit in force in this thread, if any."""
    return _scope.get()


def install() -> None:
    """Add rvhub's checks to huggingface_hub's shared HTTP client (once per client)."""
    from huggingface_hub import get_session

    scrub_logging()  # huggingface_hub adds its own log handler when imported
    hooks = get_session().event_hooks
    if _on_response not in hooks["response"]:
        hooks["request"].append(_on_request)
        hooks["response"].append(_on_response)


def _on_request(request: Any) -> None:
    if _scope.get() is not None:
        request.headers["Accept-Encoding"] = "identity"


def _on_response(response: Any) -> None:
    """Refuse an answer that could make the library write outside the cache, or send more than allowed."""
    scope = _scope.get()
    request = response.request
    repo_id = scope.repo_id if scope else _repo_from_url(str(request.url))
    host = f"the server at {request.url.scheme}://{request.url.netloc.decode(errors='replace')}"
    headers = response.headers

    def refuse(reason: str, close: bool = True) -> None:
        if close:
            response.close()
        raise HostileServerError(repo_id, host, f"sent {reason}")

    commit = headers.get("X-Repo-Commit")
    if commit is not None and not SHA1.fullmatch(commit):
        refuse(f"a commit id that is not a 40-digit hex sha1 (X-Repo-Commit {_show(commit)})")
    if request.method == "HEAD":  # the answer huggingface_hub names the cached blob after
        etag = headers.get("X-Linked-Etag") or headers.get("ETag")
        if etag is not None and not _ETAG.fullmatch(_unquote(etag)):
            refuse(f"an ETag that is not a git sha1 or a sha256 ({_show(etag)})")
    for name in ("X-Linked-Size", "Content-Length"):
        value = headers.get(name)
        if value is not None and not _DIGITS.fullmatch(value.strip()):
            refuse(f"a {name} that is not a number ({_show(value)})")
    if scope is None:
        return
    sizes = [int(headers["X-Linked-Size"])] if "X-Linked-Size" in headers else []
    if not response.is_redirect and "Content-Length" in headers and request.method == "HEAD":
        sizes.append(int(headers["Content-Length"]))
    elif not response.is_redirect and "Content-Length" in headers and 200 <= response.status_code < 300:
        sizes.append(int(headers["Content-Length"]))
    limit = scope.limit
    over = [s for s in sizes if s > limit]
    if over:
        refuse(f"{over[0]:,} bytes for {scope.what}, {_limit_text(scope)}")
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity") and request.method != "HEAD":
        refuse(f"{scope.what} compressed ({_show(encoding)}) although rvhub asked for identity")
    if request.method != "HEAD":
        response.stream = _Capped(response.stream, limit, lambda: refuse(
            f"more than {limit:,} bytes for {scope.what} ({_limit_text(scope)}); the download was stopped", False
        ))


class _Capped(httpx2.SyncByteStream):
    """A response byte stream that raises once more than ``limit`` bytes have come."""

    def __init__(self, stream: Any, limit: int, on_over: Any) -> None:
        self._stream, self._limit, self._on_over, self._seen = stream, limit, on_over, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._seen += len(chunk)
            if self._seen > self._limit:
                self._on_over()
            yield chunk

    def close(self) -> None:
        self._stream.close()


def _limit_text(scope: _Scope) -> str:
    return f"the declared size is {scope.limit:,}" if scope.declared else f"rvhub accepts at most {scope.limit:,}"


def _unquote(etag: str) -> str:
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


def _show(value: str) -> str:
    """A header value as a short, printable repr (it may hold control characters or be huge)."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _repo_from_url(url: str) -> str:
    parts = [p for p in url.split("?", 1)[0].split("/")[3:] if p]
    if parts[:2] == ["api", "models"] and len(parts) >= 4:
        return f"{parts[2]}/{parts[3]}"
    return "/".join(parts[:2]) if len(parts) >= 2 else "(server)"


def repo_cache(repo_id: str) -> Path:
    """The folder huggingface_hub keeps a model repo's cache in."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def check_tree_cache(repo_id: str, commit: str | None) -> None:
    """With xet, huggingface_hub may take a file's blob name from a tree listing it cached on disk (by a
    ``snapshot_download``, of rvhub's or another tool's) instead of a HEAD answer: those names pass the same rule."""
    if commit is None or not SHA1.fullmatch(commit):
        return
    listing = repo_cache(repo_id) / "trees" / f"{commit}.json"
    if not listing.is_file() and not listing.is_symlink():
        return
    try:
        files = read_json(listing, max_bytes=MAX_JSON_BYTES)["files"]  # bounded in size and depth
        bad = [p for p, info in files.items() if info.get("lfs_sha256") is not None
               and not (isinstance(info["lfs_sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", info["lfs_sha256"]))]
    except RvhubError as e:  # too large or too deep to parse safely: the library would not survive it either
        raise HostileServerError(repo_id, "the Hugging Face cache", f"holds a tree listing {listing.name} that "
                                 f"cannot be read safely ({e})") from e
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # huggingface_hub ignores it too
        return
    if bad or listing.is_symlink():
        raise HostileServerError(repo_id, "the Hugging Face cache", f"holds a tree listing {listing} with a blob name "
                                 f"that is not a sha256 (for {ascii(bad[0] if bad else listing.name)[:80]})")


def contained(path: Path, root: Path, repo_id: str, what: str) -> Path:
    """``path`` resolved (symlinks followed), which must lie inside ``root``; else :class:`HostileServerError`."""
    real_root = root.resolve()
    real = path.resolve()
    if not real.is_relative_to(real_root):
        raise HostileServerError(repo_id, "the Hugging Face cache", f"holds {what} resolving to {real}, outside "
                                          f"{real_root}: not read or removed")
    return real

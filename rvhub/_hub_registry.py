"""The Hugging Face Hub as a registry, through huggingface_hub (HfApi, hf_hub_download, snapshot_download).

The endpoint is HF_ENDPOINT (huggingface_hub's ``constants.ENDPOINT``) unless given; the token is whatever
huggingface_hub resolves (HF_TOKEN, then the ``hf auth login`` store) unless given. The token is never
printed or logged: error messages are built here, and any text taken from the server is scrubbed of it.
Downloads go to the Hugging Face cache, so HF_HUB_OFFLINE=1 works from what was pulled before. What the
server sends is checked before the library acts on it, and every cached path is proven to lie inside the
repo's cache folder before it is read or removed (see ``_hub_guard``); each file is capped at the size its
card declares.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_token,
    hf_hub_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.errors import RevisionNotFoundError as HfRevisionNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash
from huggingface_hub.utils.tqdm import disable_progress_bars

from . import _hub_guard as guard
from . import _transfer
from ._secrets import scrub
from .card import CARD_FILE, VectorCard
from .errors import (
    AuthError,
    DownloadIntegrityError,
    HostileServerError,
    RateLimitedError,
    RegistryError,
    RegistryUnavailableError,
    RepoNotFoundError,
    RevisionNotFoundError,
    RvhubError,
    VectorFormatError,
)
from .registry import VECTOR_TAG, Listed, PushResult, Registry, Upload, VectorRef

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 3  # a commit the Hub answers with 5xx (or a dropped connection) is retried this often
RETRY_WAIT_S = 0.5  # times the attempt number
_MAX_MESSAGE = 1 << 16  # a commit message read for `mirror`


def _no_card(ref: VectorRef) -> VectorFormatError:
    return VectorFormatError(str(ref), f"the repo has no {CARD_FILE}: it is not an rvhub vector")


class HubRegistry(Registry):
    """The Hugging Face Hub (or any Hub-compatible endpoint)."""

    def __init__(self, endpoint: str | None = None, token: str | None = None):
        self._endpoint = endpoint.rstrip("/") if endpoint else None
        self._token = token

    @property
    def endpoint(self) -> str:
        return self._endpoint or constants.ENDPOINT

    @property
    def description(self) -> str:
        return f"the Hub at {self.endpoint}"

    def __repr__(self) -> str:  # never shows the token
        return f"HubRegistry({self.endpoint!r})"

    def _api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=self._token)

    publish_writes_owned = False  # a push reads the folder (a pulled copy in the cache may be pushed elsewhere)

    def owned_paths(self) -> list[Path]:
        """The Hugging Face cache that pulls land in: no output may be, contain or lie inside it."""
        return [Path(constants.HF_HUB_CACHE)]

    # -------------------------------------------------------------- push

    def publish(
        self, repo_id: str, uploads: list[Upload], *, private: bool, branch: str, message: str, progress: bool
    ) -> PushResult:
        if self._token is None and get_token() is None:
            raise AuthError(repo_id, "pushing needs a Hugging Face token with write access: set HF_TOKEN or run "
                                     "`hf auth login`")
        api = self._api()
        guard.install()
        with self._errors(repo_id, branch, "push to"), _bars(progress):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            for attempt in range(1, COMMIT_ATTEMPTS + 1):
                head, ops = self._operations(api, repo_id, branch, uploads)
                result: dict[str, Any] = dict(repo_id=repo_id, branch=branch, files=[u.name for u in uploads],
                              registry=self.description)
                if not ops:  # after a failed attempt, an empty diff means that attempt did land
                    return PushResult(commit=head, committed=attempt > 1, uploaded=[], deleted=[], **result)
                try:
                    summary, _, description = message.partition("\n\n")  # as the Hub keeps it: title, description
                    info = api.create_commit(repo_id, ops, commit_message=summary, revision=branch,
                                             commit_description=description or None, parent_commit=head)
                except (HfHubHTTPError, httpx2.TransportError, RuntimeError) as e:
                    cause = _http_cause(e)
                    if cause is None:
                        raise
                    status = cause.response.status_code if isinstance(cause, HfHubHTTPError) else None
                    if attempt == COMMIT_ATTEMPTS or (status is not None and status < 500):
                        raise
                    logger.warning("%s answered %s on %s; retrying the push (%d/%d)", self.description,
                                   status or type(cause).__name__, _step(cause), attempt + 1, COMMIT_ATTEMPTS)
                    time.sleep(RETRY_WAIT_S * attempt)
                    continue
                return PushResult(
                    commit=info.oid, committed=info.oid != head,
                    uploaded=[o.path_in_repo for o in ops if isinstance(o, CommitOperationAdd)],
                    deleted=[o.path_in_repo for o in ops if isinstance(o, CommitOperationDelete)], **result,
                )
        raise AssertionError("unreachable")

    def _operations(
        self, api: HfApi, repo_id: str, branch: str, uploads: list[Upload]
    ) -> tuple[str, list[CommitOperationAdd | CommitOperationDelete]]:
        """The branch head and the operations that turn it into ``uploads``: changed files and stale files
        of the previous vector only (other files in the repo are left alone)."""
        head = api.model_info(repo_id, revision=branch).sha
        if head is None or not guard.SHA1.fullmatch(head):
            raise HostileServerError(repo_id, self.description,
                                     f"sent a branch head that is not a commit id ({head!r})")
        remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=head, recursive=True)
                  if isinstance(f, RepoFile)}
        ops: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=u.name, path_or_fileobj=u.source if isinstance(u.source, bytes)
                               else str(u.source))
            for u in uploads if not _same(u, remote.get(u.name))
        ]
        names = {u.name for u in uploads}
        if CARD_FILE in remote and any(o.path_in_repo == CARD_FILE for o in ops):
            old = self._download(repo_id, CARD_FILE, head, guard.MAX_CARD_BYTES, declared=False)
            for name in _card_files(old.read_bytes()):
                if name not in names and name in remote:
                    ops.append(CommitOperationDelete(path_in_repo=name))
        return head, ops

    # -------------------------------------------------------------- pull, info, search

    def fetch_card(self, ref: VectorRef) -> tuple[Path, str]:
        with self._errors(ref.repo_id, ref.revision, "read"):
            try:
                path = self._download(ref.repo_id, CARD_FILE, ref.revision, guard.MAX_CARD_BYTES, declared=False)
            except EntryNotFoundError as e:
                if isinstance(e, LocalEntryNotFoundError):
                    raise
                raise _no_card(ref) from e
        commit = path.parent.name  # the cache's snapshots/<commit>/ folder
        if not guard.SHA1.fullmatch(commit):
            raise HostileServerError(ref.repo_id, "the Hugging Face cache",
                                     f"holds a snapshot folder {commit!r} that is not a commit id")
        return path.parent, commit

    def read_card(self, ref: VectorRef) -> tuple[VectorCard, str]:
        """At a commit (as a listing gives it): one bounded GET of ``rvhub.json``, read in memory and not cached,
        instead of ``hf_hub_download``'s HEAD, GET and cache writes. A redirect (a renamed repo), offline mode or
        a branch name take the :meth:`fetch_card` way."""
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.utils._headers import build_hf_headers
        from huggingface_hub.utils._http import hf_raise_for_status

        commit = ref.revision
        if commit is None or not guard.SHA1.fullmatch(commit) or constants.HF_HUB_OFFLINE:
            return super().read_card(ref)
        url = hf_hub_url(ref.repo_id, CARD_FILE, revision=commit, endpoint=self.endpoint)
        headers = {**build_hf_headers(token=self._token), "Accept-Encoding": "identity"}
        with self._errors(ref.repo_id, commit, "read"), guard.bounded(ref.repo_id, CARD_FILE, guard.MAX_CARD_BYTES):
            response = get_session().get(url, headers=headers, follow_redirects=False,
                                         timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
            if response.is_redirect:
                return super().read_card(ref)
            try:
                hf_raise_for_status(response)
            except EntryNotFoundError as e:
                raise _no_card(ref) from e
            served = response.headers.get("X-Repo-Commit")
            if served is not None and served != commit:
                raise HostileServerError(ref.repo_id, self.description,
                                         f"sent {CARD_FILE} of commit {served[:12]} for commit {commit[:12]}")
            try:
                text = response.content.decode("utf-8")
            except ValueError as e:
                raise VectorFormatError(str(ref), f"cannot read {CARD_FILE}: {e}") from e
        return VectorCard.from_json(text, f"{ref.repo_id}@{commit[:12]}"), commit

    def fetch(self, repo_id: str, commit: str, names: list[str], progress: bool) -> Path:
        """Each file, one at a time, capped at the size the card of ``commit`` (already fetched) declares."""
        if not guard.SHA1.fullmatch(commit):
            raise HostileServerError(repo_id, self.description, f"sent a commit id {commit!r} that is not a sha1")
        folder = guard.repo_cache(repo_id) / "snapshots" / commit
        entries = {e.path: e for e in VectorCard.read(folder).files}
        with self._errors(repo_id, commit, "download"), _bars(progress):
            for name in names:
                entry = entries.get(name)
                if entry is None or constants.HF_HUB_OFFLINE:  # the card itself; or offline: from the cache
                    self._download(repo_id, name, commit, guard.MAX_CARD_BYTES if entry is None else entry.size,
                                   declared=entry is not None)
                    continue
                try:  # resumable, and verified against the card before it is cached (see _transfer)
                    _transfer.download(repo_id, name, commit, size=entry.size, sha256=entry.sha256,
                                       endpoint=self.endpoint, token=self._token, progress=progress)
                except _transfer.Mismatch as e:
                    raise DownloadIntegrityError(f"{repo_id}@{commit[:12]}", name, self.description) from e
        return folder

    def _download(self, repo_id: str, name: str, revision: str | None, limit: int, *, declared: bool) -> Path:
        """``hf_hub_download`` of one file, at most ``limit`` bytes; the path it returns, proven to lie (with
        the blob it links to) inside the repo's cache folder."""
        guard.check_tree_cache(repo_id, revision)
        with guard.bounded(repo_id, name, limit, declared=declared):
            path = Path(hf_hub_download(repo_id, name, revision=revision, endpoint=self.endpoint, token=self._token))
        guard.contained(path, guard.repo_cache(repo_id), repo_id, f"the cached {name}")
        return path

    def discard(self, folder: Path, names: list[str]) -> None:
        root = folder.parent.parent  # <cache>/models--org--name/, from <root>/snapshots/<commit>/
        repo_id = root.name.removeprefix("models--").replace("--", "/")
        for name in names:
            link = folder / name
            if link.is_symlink():  # the cache links snapshots/<commit>/<name> to blobs/<etag>
                guard.contained(link.parent, root, repo_id, f"the folder of the cached {name}")
                blob = guard.contained(link, root / "blobs", repo_id, f"the cached {name}")
                blob.unlink(missing_ok=True)
            link.unlink(missing_ok=True)

    def commit_message(self, repo_id: str, commit: str) -> str | None:
        """The first entry of the commit list at ``commit`` (one page, bounded JSON), which must be that commit."""
        from huggingface_hub import get_session
        from huggingface_hub.utils._headers import build_hf_headers
        from huggingface_hub.utils._http import hf_raise_for_status

        from ._untrusted import parse_json

        if not guard.SHA1.fullmatch(commit):
            raise HostileServerError(repo_id, self.description, f"sent a commit id {commit!r} that is not a sha1")
        url = f"{self.endpoint}/api/models/{repo_id}/commits/{commit}"
        with self._errors(repo_id, commit, "read"), guard.bounded(repo_id, "the commit list", guard.MAX_API_BYTES):
            response = get_session().get(url, headers=build_hf_headers(token=self._token))
            hf_raise_for_status(response)
            items = parse_json(response.content, "the commit list", max_bytes=guard.MAX_API_BYTES,
                               error=lambda why: HostileServerError(repo_id, self.description,
                                                                    f"sent a commit list rvhub cannot read ({why})"))
        first = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
        title, message = first.get("title"), first.get("message")
        if first.get("id") != commit or not isinstance(title, str) or not isinstance(message, str):
            raise HostileServerError(repo_id, self.description, f"sent a commit list that does not start with "
                                     f"commit {commit[:12]} and its title and message")
        if len(title) + len(message) > _MAX_MESSAGE:
            raise HostileServerError(repo_id, self.description, f"sent a commit message of "
                                     f"{len(title) + len(message):,} characters (rvhub takes at most {_MAX_MESSAGE:,})")
        return f"{title}\n\n{message}" if message.strip() else title

    def list_vectors(self, query: str | None, tags: list[str], limit: int | None, sort: str | None) -> list[Listed]:
        """One ``list_models`` listing filtered by ``tags``, followed page by page (the Link header) up to
        ``limit``; each page is bounded like any answer, and what it says of a model is taken only where it has
        the right type."""
        bounded = guard.bounded("(search)", "the model list", guard.MAX_API_BYTES)
        with self._errors("(search)", None, "search"), bounded, _pages_counted(self.description):
            models = self._api().list_models(
                filter=tags or [VECTOR_TAG], search=query or None, limit=limit, sort=sort,  # type: ignore[arg-type]
                expand=["sha", "tags", "downloads", "likes", "lastModified"],
            )
            return [_listed_model(m) for m in models]

    # -------------------------------------------------------------- errors

    @contextlib.contextmanager
    def _errors(self, repo_id: str, revision: str | None, action: str) -> Iterator[None]:
        """huggingface_hub's exceptions as rvhub errors that say what to do (and never hold the token).

        Each HTTP status has its own message; an answer the library could not use (bad JSON, a wrong shape, a
        body of another size than declared) is a :class:`HostileServerError`, never a traceback."""
        guard.install()
        try:
            with guard.bounded(repo_id, "an answer", guard.MAX_API_BYTES) if guard.current() is None \
                    else contextlib.nullcontext():
                yield
        except RvhubError:
            raise
        except HfRevisionNotFoundError as e:
            raise RevisionNotFoundError(repo_id, revision or "main") from e
        except LocalEntryNotFoundError as e:
            cause = _http_cause(e)
            if isinstance(cause, HostileServerError):
                raise cause from e
            if isinstance(cause, HfHubHTTPError):
                raise self._status_error(cause, repo_id, action) from e
            if isinstance(cause, FileMetadataError):
                raise HostileServerError(repo_id, self.description, "sent a file answer without the X-Repo-Commit or "
                                         "ETag header (not a Hub-compatible server?)") from e
            why = ("HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE
                   else f"{self.description} could not be reached")
            raise RegistryUnavailableError(
                repo_id, action, f"not in the local Hugging Face cache and {why}"
            ) from e
        except OfflineModeIsEnabled as e:
            raise RegistryUnavailableError(repo_id, action, "not in the local Hugging Face cache and "
                                           "HF_HUB_OFFLINE=1 is set") from e
        except Exception as e:
            cause = _http_cause(e)
            if isinstance(cause, RvhubError):
                raise cause from e
            if isinstance(cause, HfHubHTTPError):
                raise self._status_error(cause, repo_id, action) from e
            if isinstance(cause, httpx2.TransportError):
                raise RegistryUnavailableError(repo_id, action, f"connection to {self.description} failed "
                                               f"({type(cause).__name__}); nothing was written") from e
            if isinstance(e, OSError) and "Consistency check failed" in str(e):
                raise HostileServerError(repo_id, self.description, "sent a file of another size than it declared "
                                         "(the download was dropped)") from e
            if isinstance(e, OSError):
                raise RegistryError(repo_id, f"{action} {repo_id}: cannot write to the Hugging Face cache: "
                                             f"{e.strerror or e}") from e
            if isinstance(e, (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError)):
                raise HostileServerError(repo_id, self.description, "sent an answer rvhub cannot read "
                                         f"({type(e).__name__}: {self._scrub(_first_line(e))})") from e
            raise

    def _status_error(self, e: HfHubHTTPError, repo_id: str, action: str) -> RegistryError:
        """One message per HTTP status: denied (401/403), not found (404), rate-limited (429), server error."""
        status = e.response.status_code
        step = _step(e)
        has_token = bool(self._token or get_token())
        if isinstance(e, (RepositoryNotFoundError, GatedRepoError)) and (status == 404 or not has_token):
            return RepoNotFoundError(repo_id, self.description)
        if status == 401:
            if has_token:
                return AuthError(repo_id, f"{self.description} refused the token on {step} (from HF_TOKEN or "
                                          "`hf auth login`); check that it is valid")
            return AuthError(repo_id, f"{self.description} asks for a token on {step}: set HF_TOKEN or run "
                                      "`hf auth login`")
        if status == 403:
            return AuthError(repo_id, f"{self.description} denied {step}: the token may not {action} this repo")
        if status == 404:
            return RegistryError(repo_id, f"{action} {repo_id}: {self.description} answered 404 (not found) on "
                                          f"{step}: {self._scrub(_server_message(e))}")
        if status == 429:
            return RateLimitedError(repo_id, action, self.description, _retry_after(e))
        if status >= 500:
            return RegistryUnavailableError(repo_id, action, f"{self.description} answered {status} (server error) "
                                            f"on {step}; nothing was changed, try again later")
        return RegistryError(repo_id, f"{action} {repo_id}: {self.description} answered {status} on {step}: "
                                      f"{self._scrub(_server_message(e))}")

    def _scrub(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, "***")
        return scrub(text)

MAX_LIST_PAGES = 1000  # pages of one listing: the Hub's are 1,000 models; a server sending endless pages stops here
_pages: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("rvhub_list_pages", default=None)


@contextlib.contextmanager
def _pages_counted(where: str) -> Iterator[None]:
    """Within this block, a listing that asks for more than :data:`MAX_LIST_PAGES` pages is refused: the
    client follows every Link header a server sends, and its limit counts models, not (empty) pages."""
    from huggingface_hub import get_session

    hooks = get_session().event_hooks["request"]
    if _count_page not in hooks:
        hooks.append(_count_page)
    token = _pages.set({"n": 0, "where": where})
    try:
        yield
    finally:
        _pages.reset(token)


def _count_page(request: Any) -> None:
    state = _pages.get()
    if state is None or str(request.url.path).rstrip("/") != "/api/models":
        return
    state["n"] += 1
    if state["n"] > MAX_LIST_PAGES:
        raise HostileServerError("(search)", state["where"], f"sent more than {MAX_LIST_PAGES} pages of one model list")


def _listed_model(m: Any) -> Listed:
    tags = m.tags if isinstance(m.tags, list) and all(isinstance(t, str) for t in m.tags) else None
    modified = getattr(m, "last_modified", None)
    return Listed(
        repo_id=str(m.id), commit=m.sha if isinstance(m.sha, str) else None,
        tags=tuple(tags) if tags is not None else None,
        downloads=m.downloads if type(m.downloads) is int else None,
        likes=m.likes if type(m.likes) is int else None,
        last_modified=modified.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(modified, datetime) else None,
    )


def _server_message(e: HfHubHTTPError) -> str:
    return ascii((e.server_message or _first_line(e)).strip())[1:-1][:200]


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return ascii(lines[0] if lines else "")[1:-1][:200]


def _http_cause(e: BaseException) -> BaseException | None:
    """The first HTTP status error, transport error or rvhub error in ``e``'s cause chain (``e`` included)."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (HfHubHTTPError, httpx2.TransportError, RvhubError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def _step(e: BaseException) -> str:
    """Which step of the protocol a failed request was, from its URL."""
    request = getattr(getattr(e, "response", None), "request", None) or getattr(e, "request", None)
    try:
        path = str(request.url.path) if request is not None else ""
    except RuntimeError:  # a transport error without a request
        path = ""
    if path.rstrip("/") == "/api/models":
        return "the model list"
    for fragment, step in (("/preupload/", "preupload"), ("/info/lfs/", "the LFS batch"), ("/commit/", "commit"),
                           ("/tree/", "the file listing"), ("/resolve/", "a file download"),
                           ("/api/models/", "the repo info"), ("/api/repos/", "repo creation")):
        if fragment in path:
            return step
    return "an upload" if request is not None and request.method == "PUT" else "a request"


def _retry_after(e: HfHubHTTPError) -> float | None:
    value = e.response.headers.get("Retry-After", "")
    try:
        wait = float(value)
    except ValueError:
        return None
    return wait if 0 <= wait < 1e7 else None


def _same(upload: Upload, remote: RepoFile | None) -> bool:
    """Whether the remote file has the upload's content: LFS files by sha256, others by git blob id."""
    if remote is None or remote.size != upload.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == upload.sha256()
    return remote.blob_id == git_hash(upload.read())


def _card_files(raw: bytes) -> list[str]:
    """The file names a (previous, possibly older-schema) card lists; nothing if it cannot be read."""
    from ._untrusted import MAX_CARD_BYTES, parse_json

    try:
        data: Any = parse_json(raw, CARD_FILE, max_bytes=MAX_CARD_BYTES)  # bounded: a deep card raised RecursionError
        return [str(f["path"]) for f in data.get("files", [])]
    except (RvhubError, ValueError, TypeError, KeyError, AttributeError):
        return []


@contextlib.contextmanager
def _bars(progress: bool) -> Iterator[None]:
    """huggingface_hub's progress bars, off unless ``progress`` (HF_HUB_DISABLE_PROGRESS_BARS also works)."""
    if progress:
        yield
        return
    with disable_progress_bars():
        yield


# ------------------------------------------------------------------ targets for `search --base`

"""The Hugging Face Hub as a registry, through huggingface_hub (HfApi, hf_hub_download, snapshot_download).

The endpoint is HF_ENDPOINT (huggingface_hub's ``constants.ENDPOINT``) unless given; the token is whatever
huggingface_hub resolves (HF_TOKEN, then the ``hf auth login`` store) unless given. The token is never
printed or logged: error messages are built here, and any text taken from the server is scrubbed of it.
Downloads go to the Hugging Face cache, so HF_HUB_OFFLINE=1 works from what was pulled before.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import time
from collections.abc import Iterator
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
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
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

from .card import CARD_FILE
from .errors import (
    AuthError,
    RegistryError,
    RegistryUnavailableError,
    RepoNotFoundError,
    RevisionNotFoundError,
    VectorFormatError,
)
from .registry import VECTOR_TAG, PushResult, Registry, Upload, VectorRef

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 3  # a commit the Hub answers with 5xx (or a dropped connection) is retried this often
RETRY_WAIT_S = 0.5  # times the attempt number


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

    # -------------------------------------------------------------- push

    def publish(
        self, repo_id: str, uploads: list[Upload], *, private: bool, branch: str, message: str, progress: bool
    ) -> PushResult:
        if self._token is None and get_token() is None:
            raise AuthError(repo_id, "pushing needs a Hugging Face token with write access: set HF_TOKEN or run "
                                     "`hf auth login`")
        api = self._api()
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
                    info = api.create_commit(repo_id, ops, commit_message=message, revision=branch,
                                             parent_commit=head)
                except (HfHubHTTPError, httpx2.TransportError) as e:
                    status = e.response.status_code if isinstance(e, HfHubHTTPError) else None
                    if attempt == COMMIT_ATTEMPTS or (status is not None and status < 500):
                        raise
                    logger.warning("the Hub failed on commit (%s); retrying (%d/%d)",
                                   status or type(e).__name__, attempt + 1, COMMIT_ATTEMPTS)
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
        assert head is not None
        remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=head, recursive=True)
                  if isinstance(f, RepoFile)}
        ops: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=u.name, path_or_fileobj=u.source if isinstance(u.source, bytes)
                               else str(u.source))
            for u in uploads if not _same(u, remote.get(u.name))
        ]
        names = {u.name for u in uploads}
        if CARD_FILE in remote and any(o.path_in_repo == CARD_FILE for o in ops):
            old = Path(hf_hub_download(repo_id, CARD_FILE, revision=head, endpoint=self.endpoint, token=self._token))
            for name in _card_files(old.read_bytes()):
                if name not in names and name in remote:
                    ops.append(CommitOperationDelete(path_in_repo=name))
        return head, ops

    # -------------------------------------------------------------- pull, info, search

    def fetch_card(self, ref: VectorRef) -> tuple[Path, str]:
        with self._errors(ref.repo_id, ref.revision, "read"):
            try:
                path = Path(hf_hub_download(ref.repo_id, CARD_FILE, revision=ref.revision, endpoint=self.endpoint,
                                            token=self._token))
            except EntryNotFoundError as e:
                if isinstance(e, LocalEntryNotFoundError):
                    raise
                raise VectorFormatError(str(ref), f"the repo has no {CARD_FILE}: it is not an rvhub vector") from e
        return path.parent, path.parent.name  # the cache's snapshots/<commit>/ folder

    def fetch(self, repo_id: str, commit: str, names: list[str], progress: bool) -> Path:
        with self._errors(repo_id, commit, "download"), _bars(progress):
            folder = snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(n) for n in names],
                                       endpoint=self.endpoint, token=self._token)
        return Path(folder)

    def discard(self, folder: Path, names: list[str]) -> None:
        for name in names:
            link = folder / name
            if link.is_symlink():  # the cache links snapshots/<commit>/<name> to blobs/<etag>
                link.resolve().unlink(missing_ok=True)
            link.unlink(missing_ok=True)

    def list_repos(self, query: str | None, limit: int) -> list[tuple[str, str | None]]:
        with self._errors("(search)", None, "search"):
            models = self._api().list_models(filter=VECTOR_TAG, search=query or None, limit=limit)
            return [(m.id, m.sha) for m in models]

    # -------------------------------------------------------------- errors

    @contextlib.contextmanager
    def _errors(self, repo_id: str, revision: str | None, action: str) -> Iterator[None]:
        """huggingface_hub's exceptions as rvhub errors that say what to do (and never hold the token)."""
        try:
            yield
        except HfRevisionNotFoundError as e:
            raise RevisionNotFoundError(repo_id, revision or "main") from e
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise RepoNotFoundError(repo_id, self.description) from e
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            why = ("HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached")
            raise RegistryUnavailableError(
                repo_id, action, f"not in the local Hugging Face cache and {why}"
            ) from e
        except HfHubHTTPError as e:
            status = e.response.status_code
            if status == 401:
                raise AuthError(repo_id, f"{self.description} refused the token (from HF_TOKEN or `hf auth login`); "
                                         "check that it is valid") from e
            if status == 403:
                raise AuthError(repo_id, f"the token may not {action} this repo on {self.description}") from e
            if status >= 500:
                raise RegistryUnavailableError(repo_id, action, f"{self.description} answered {status}; "
                                               "nothing was changed, try again later") from e
            raise RegistryError(repo_id, f"{action} {repo_id}: {self.description} answered {status}: "
                                         f"{self._scrub(_server_message(e))}") from e
        except httpx2.TransportError as e:
            raise RegistryUnavailableError(repo_id, action, f"connection to {self.description} failed "
                                           f"({type(e).__name__}); nothing was written") from e

    def _scrub(self, text: str) -> str:
        for token in (self._token, get_token()):
            if token:
                text = text.replace(token, "***")
        return text


def _server_message(e: HfHubHTTPError) -> str:
    return (e.server_message or str(e).splitlines()[0]).strip()


def _same(upload: Upload, remote: RepoFile | None) -> bool:
    """Whether the remote file has the upload's content: LFS files by sha256, others by git blob id."""
    if remote is None or remote.size != upload.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == upload.sha256()
    return remote.blob_id == git_hash(upload.read())


def _card_files(raw: bytes) -> list[str]:
    """The file names a (previous, possibly older-schema) card lists; nothing if it cannot be read."""
    try:
        data: Any = json.loads(raw)
        return [str(f["path"]) for f in data.get("files", [])]
    except (ValueError, TypeError, KeyError, AttributeError):
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

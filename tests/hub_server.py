"""A local Hugging Face Hub-compatible HTTP server: the test fixture the Hub registry is tested against.

It implements the endpoints the huggingface_hub client calls to create a repo, upload files in one commit
(preupload, LFS batch + PUT, NDJSON commit), read repo info and trees, resolve and download files (HEAD/GET,
Range) and list models, with the headers the client reads (X-Repo-Commit, ETag/X-Linked-Etag,
X-Linked-Size, X-Error-Code). Everything lives in memory. One token is valid; writes need it, and so do reads
of private repos; any other token is refused on every endpoint, as the Hub does.

Fault hooks for tests: ``fail_next_commits`` (answer 500), ``drop_next_downloads`` / ``cut_downloads`` (send
the headers and the body up to a byte position of the file, then close the connection), ``fail_lfs_uploads``
(answer 500 to LFS uploads from the k-th on), ``cut_lfs_uploads`` (read an LFS upload up to a fraction of its
body, then close the connection), ``tamper`` (flip stored bytes so they no longer match their hash). Byte
counters: ``sent`` (file body bytes sent, per file name) and ``received`` (LFS upload body bytes read, per
sha256), whatever became of them.

It is a test fixture, not a product feature: no xet, no PRs, no tags, only model repos.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import yaml
from hostile_hub import Hostile

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".npy", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores big files in LFS whatever their name


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    """A file's content and the hashes recorded when it was committed (tamper changes only ``data``)."""

    data: bytearray
    sha256: str
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """The git blob id: of the content, or of the LFS pointer file."""
        return git_blob_oid(self.pointer if self.lfs else bytes(self.data))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    created: str = ""
    downloads: int = 0  # what the model list reports and sorts by (set by tests)
    likes: int = 0

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev, rev)
        return self.commits.get(oid)

    def history(self, branch: str = "main") -> list[str]:
        """Commit oids from the branch head back to the first commit."""
        out, oid = [], self.branches.get(branch)
        while oid is not None:
            out.append(oid)
            oid = self.commits[oid].parent
        return out


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Faults:
    fail_commits: int = 0  # answer 500 to this many commit requests
    drops: dict[str, list[int]] = field(default_factory=dict)  # file name -> the file position each next GET stops at
    lfs_ok: int | None = None  # with lfs_fail: LFS uploads still answered normally before the failures start
    lfs_fail: int = 0  # then answer 500 to this many LFS uploads (after reading their bodies)
    lfs_cuts: list[float] = field(default_factory=list)  # the next LFS uploads: close after this fraction of the body

    def clear(self) -> None:
        self.fail_commits, self.lfs_ok, self.lfs_fail = 0, None, 0
        self.drops.clear()
        self.lfs_cuts.clear()


class LocalHub:
    """The server's state and its test-facing API. Start with ``LocalHub.start(token)``."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # uploaded LFS objects by sha256, waiting for (or used by) commits
        self.faults = Faults()
        self.hostile: Hostile | None = None  # a lying server (tests/hostile_hub.py); None: an honest one
        # like the Hub: /resolve/ of an LFS file answers 302 to a CDN URL (/_cdn/<sha256>/<name>), whose answers
        # carry an ETag of their own and no X-Repo-Commit
        self.redirect_lfs = False
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.sent: Counter[str] = Counter()  # body bytes of /resolve/ GETs sent, per file name
        self.received: Counter[str] = Counter()  # body bytes of LFS uploads read, per sha256 oid
        self.page_size = 1000  # the model list's page, as the Hub's (more: a Link header to the next page)
        self.cards: dict[str, dict[str, Any] | None] = {}  # commit oid -> its README's YAML, parsed once
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    @classmethod
    def start(cls, token: str) -> LocalHub:
        hub = cls(token)
        server = _Server(("127.0.0.1", 0), _handler_for(hub))
        server.daemon_threads = True
        hub._server = server
        hub.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True, name="local-hub").start()
        return hub

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ---------------------------------------------------------------- test hooks

    def fail_next_commits(self, n: int = 1) -> None:
        """Answer the next ``n`` commit requests with 500 (nothing is committed)."""
        self.faults.fail_commits = n

    def drop_next_downloads(self, filename: str, n: int = 1, after_bytes: int = 1024) -> None:
        """The next ``n`` GETs of ``filename`` send full headers and the body up to byte ``after_bytes`` of the
        file, then close (a Range GET that starts at or past it sends no byte)."""
        self.cut_downloads(filename, *[after_bytes] * n)

    def cut_downloads(self, filename: str, *positions: int) -> None:
        """The next GETs of ``filename``, one per position: headers, then the body up to that byte of the file,
        then the connection closes."""
        self.faults.drops[filename] = list(positions)

    def fail_lfs_uploads(self, after: int, n: int = 1000) -> None:
        """LFS uploads: ``after`` more are stored, then ``n`` are answered 500 (their bodies are read first)."""
        self.faults.lfs_ok, self.faults.lfs_fail = after, n

    def cut_lfs_uploads(self, *fractions: float, after: int = 0) -> None:
        """After ``after`` more LFS uploads are stored, the next ones, one per fraction: that fraction of the body
        is read, then the connection closes."""
        self.faults.lfs_cuts = list(fractions)
        self.faults.lfs_ok = after if after else None

    def tamper(self, repo_id: str, path: str, revision: str = "main") -> None:
        """Flip the bytes of a stored file in place (same size; its recorded hashes are left as they were)."""
        with self.lock:
            commit = self.repos[repo_id].resolve(revision)
            assert commit is not None
            data = commit.files[path].data
            mid = len(data) // 2
            data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
            self.cards.pop(commit.oid, None)

    def history(self, repo_id: str, branch: str = "main") -> list[str]:
        with self.lock:
            return self.repos[repo_id].history(branch) if repo_id in self.repos else []

    def requests(self, method: str, fragment: str) -> int:
        """How many requests with this method had ``fragment`` in their path."""
        return sum(1 for m, p, _ in self.log if m == method and fragment in p)

    # ---------------------------------------------------------------- state changes

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, Blob], message: str) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        body = json.dumps([parent, message, sorted((p, b.sha256) for p, b in files.items()), len(repo.commits)])
        oid = hashlib.sha1(body.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, message, files, stamp)
        return oid

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private, created=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        files = {".gitattributes": Blob(bytearray(attrs), hashlib.sha256(attrs).hexdigest(), lfs=False)}
        repo.branches["main"] = self._new_commit(repo, None, files, "initial commit")
        self.repos[repo_id] = repo
        return repo


# -------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer (as a bounded client does) is no error of the fixture's; the
        default handler would print it on stderr, which tests read."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer has a Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # requests go to hub.log, not stderr
        pass

    # ------------------------------------------------------------ plumbing

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v for k, v in parse_qs(url.query).items()}
        self.parts = [unquote(p) for p in url.path.strip("/").split("/")]
        status = 500
        try:
            hostile = self.hub.hostile.handle(self, method, _step(method, self.parts, self.headers), self.parts) \
                if self.hub.hostile is not None else None
            status = self._dispatch(method, self.parts) if hostile is None else hostile
        except HubError as e:
            status = e.status
            message = e.message
            if self.hub.hostile is not None and self.hub.hostile.echo_auth:
                message += f" (you sent Authorization: {self.headers.get('Authorization')})"
            self._send_json(e.status, {"error": message}, {**({"X-Error-Code": e.code} if e.code else {}),
                                                            "X-Error-Message": message, **e.headers})
        except Exception as e:  # a bug in this fixture: answer it, so the test fails with a readable message
            self._send_json(500, {"error": f"local hub fixture: {e!r}"})
            raise
        finally:
            with self.hub.lock:
                self.hub.log.append((method, url.path, status))

    def do_GET(self) -> None:  # noqa: N802
        self._route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except ValueError as e:
            raise HubError(400, f"invalid JSON: {e}") from e

    def _send(self, status: int, body: bytes, headers: dict[str, str], length: int | None = None) -> None:
        if self.hub.hostile is not None:
            headers = self.hub.hostile.rewrite(self, headers)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    # ------------------------------------------------------------ auth and lookups

    def _authorized(self) -> bool:
        """True with the valid token, False with none; any other token is refused outright."""
        auth = self.headers.get("Authorization")
        if auth is None:
            return False
        if auth != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _require_write(self) -> None:
        if not self._authorized():
            raise HubError(401, "You must be authenticated to write to a repo")

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        authorized = self._authorized()
        if write and not authorized:
            raise HubError(401, "You must be authenticated to write to a repo")
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(401 if not authorized else 404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------ routes

    def _dispatch(self, method: str, p: list[str]) -> int:
        with self.hub.lock:
            if method == "POST" and p[:3] == ["api", "repos", "create"]:
                return self._create_repo()
            if method == "POST" and p[:2] == ["api", "validate-yaml"]:
                return self._validate_yaml()
            if method == "GET" and p == ["api", "models"]:
                return self._list_models()
            if p[:2] == ["api", "models"] and len(p) >= 4:
                repo_id, rest = f"{p[2]}/{p[3]}", p[4:]
                if method == "GET" and not rest:
                    return self._model_info(repo_id, "main")
                if method == "GET" and rest[:1] == ["revision"] and len(rest) >= 2:
                    return self._model_info(repo_id, "/".join(rest[1:]))
                if method == "GET" and rest[:1] == ["commits"] and len(rest) >= 2:
                    return self._commits(repo_id, "/".join(rest[1:]))
                if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]))
                if method == "POST" and rest[:1] == ["preupload"] and len(rest) >= 2:
                    return self._preupload(repo_id, "/".join(rest[1:]))
                if method == "POST" and rest[:1] == ["branch"] and len(rest) >= 2:
                    return self._create_branch(repo_id, "/".join(rest[1:]))
            if len(p) == 6 and p[2:] == ["info", "lfs", "objects", "batch"] and p[1].endswith(".git"):
                return self._lfs_batch(f"{p[0]}/{p[1][:-4]}")
            if method == "PUT" and p[:1] == ["_lfs"] and len(p) == 2:
                return self._lfs_put(p[1])
        # outside the lock: the commit may wait for the body, downloads stream
        if method == "POST" and p[:2] == ["api", "models"] and len(p) >= 6 and p[4] == "commit":
            return self._commit_route(f"{p[2]}/{p[3]}", "/".join(p[5:]))
        if method in ("GET", "HEAD") and len(p) >= 5 and p[2] == "resolve":
            return self._resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        if method in ("GET", "HEAD") and len(p) == 3 and p[0] == "_cdn":
            return self._cdn(p[1], p[2])
        raise HubError(404, f"no route for {method} /{'/'.join(p)}")

    def _create_repo(self) -> int:
        self._require_write()
        body = self._json_body()
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            self._send_json(409, {"error": "You already created this model repo", "url": url})
            return 409
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.hub.create_repo(repo_id, private)
        self._send_json(200, {"url": url, "name": repo_id})
        return 200

    def _validate_yaml(self) -> int:
        content = self._json_body().get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            if match:
                yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            raise HubError(400, f"invalid YAML in README.md: {e}") from e
        self._send_json(200, {"errors": [], "warnings": []})
        return 200

    def _create_branch(self, repo_id: str, branch: str) -> int:
        repo = self._repo(repo_id, write=True)
        start = self._json_body().get("startingPoint") or "main"
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self._commit(repo, start).oid
        self._send_json(200, {})
        return 200

    def _preupload(self, repo_id: str, rev: str) -> int:
        repo = self._repo(repo_id, write=True)
        commit = self._commit(repo, rev)
        files = []
        for f in self._json_body()["files"]:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            old = commit.files.get(f["path"])
            oid = (old.sha256 if old.lfs else old.oid) if old is not None and old.lfs == lfs else None
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send_json(200, {"files": files, "commitOid": commit.oid})
        return 200

    def _lfs_batch(self, repo_id: str) -> int:
        self._repo(repo_id, write=True)
        objects = []
        for obj in self._json_body()["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs:  # already stored: no action, the client skips the upload
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}"}}
            objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body, {"Content-Type": "application/vnd.git-lfs+json"})
        return 200

    def _lfs_put(self, oid: str) -> int:
        faults = self.hub.faults
        if faults.lfs_cuts and not (faults.lfs_ok or 0) > 0:  # read part of the body, then hang up
            fraction = faults.lfs_cuts.pop(0)
            length = int(self.headers.get("Content-Length") or 0)
            part = self.rfile.read(int(length * fraction))
            self.hub.received[oid] += len(part)
            self.close_connection = True
            self.connection.shutdown(2)
            return 0
        data = self._body()
        self.hub.received[oid] += len(data)
        if faults.lfs_ok is not None and faults.lfs_ok <= 0 and faults.lfs_fail > 0:
            faults.lfs_fail -= 1
            raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        if faults.lfs_ok is not None and faults.lfs_ok > 0:
            faults.lfs_ok -= 1
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256 oid")
        self.hub.lfs[oid] = data
        self._send(200, b"", {})
        return 200

    def _commit_route(self, repo_id: str, rev: str) -> int:
        body = self._body()
        with self.hub.lock:
            repo = self._repo(repo_id, write=True)
            if self.hub.faults.fail_commits > 0:
                self.hub.faults.fail_commits -= 1
                raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
            parent = self._commit(repo, rev)
            if rev not in repo.branches:
                raise HubError(400, f"cannot commit to {rev}: not a branch")
            files = dict(parent.files)
            header: dict[str, Any] = {}
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    data = base64.b64decode(value["content"])
                    files[value["path"]] = Blob(bytearray(data), hashlib.sha256(data).hexdigest(), lfs=False)
                elif key == "lfsFile":
                    data = self.hub.lfs.get(value["oid"])
                    if data is None or len(data) != value["size"]:
                        raise HubError(422, f"LFS object {value['oid']} was not uploaded")
                    files[value["path"]] = Blob(bytearray(data), value["oid"], lfs=True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {k: v for k, v in files.items() if not k.startswith(value["path"].rstrip("/") + "/")}
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            if header.get("parentCommit") and header["parentCommit"] != parent.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            # like `git commit --allow-empty`: content equal to the parent's still makes a commit, so a client
            # that does not detect its own no-op shows up in the history
            message = header.get("summary", "") + (f"\n\n{header['description']}" if header.get("description") else "")
            oid = self.hub._new_commit(repo, parent.oid, files, message)
            repo.branches[rev] = oid
        self._send_json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}"})
        return 200

    def _card_data(self, commit: Commit) -> dict[str, Any] | None:
        if commit.oid not in self.hub.cards:  # a commit never changes (tamper forgets it): parse once
            self.hub.cards[commit.oid] = self._parse_card(commit)
        return self.hub.cards[commit.oid]

    def _parse_card(self, commit: Commit) -> dict[str, Any] | None:
        readme = commit.files.get("README.md")
        match = re.match(r"^---\n(.*?)\n---", bytes(readme.data).decode(errors="replace"), re.S) if readme else None
        if not match:
            return None
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def _summary(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        card = self._card_data(commit) or {}
        tags = [str(t) for t in card.get("tags") or []]
        if card.get("library_name"):
            tags.append(str(card["library_name"]))
        return {
            "_id": repo.id, "id": repo.id, "modelId": repo.id, "author": repo.id.split("/")[0], "sha": commit.oid,
            "private": repo.private, "gated": False, "disabled": False, "downloads": repo.downloads,
            "likes": repo.likes,
            "tags": tags, "library_name": card.get("library_name"), "lastModified": commit.date,
            "createdAt": repo.created,
        }

    def _model_info(self, repo_id: str, rev: str) -> int:
        repo = self._repo(repo_id)
        commit = self._commit(repo, rev)
        info = self._summary(repo, commit)
        info["cardData"] = self._card_data(commit)
        info["siblings"] = [{"rfilename": path} for path in sorted(commit.files)]
        self._send_json(200, info)
        return 200

    def _list_models(self) -> int:
        authorized = self._authorized()
        want_tags = self.query.get("filter", [])
        search = (self.query.get("search") or [""])[0].lower()
        author = (self.query.get("author") or [None])[0]
        limit = int((self.query.get("limit") or [str(self.hub.page_size)])[0])
        sort = (self.query.get("sort") or [None])[0]
        cursor = int((self.query.get("cursor") or ["0"])[0])
        keys = {"downloads": "downloads", "likes": "likes", "lastModified": "lastModified", "createdAt": "createdAt"}
        if sort is not None and sort not in keys:
            raise HubError(400, f"invalid sort {sort!r}")
        out = []
        for repo_id in sorted(self.hub.repos):
            repo = self.hub.repos[repo_id]
            if repo.private and not authorized:
                continue
            info = self._summary(repo, repo.commits[repo.branches["main"]])
            if all(t in info["tags"] for t in want_tags) and search in repo_id.lower() and author in (
                None, info["author"]
            ):
                out.append(info)
        if sort is not None:  # the Hub sorts descending; equal keys stay in id order
            out.sort(key=lambda m: m[keys[sort]], reverse=True)
        page = out[cursor : cursor + min(limit, self.hub.page_size)]
        headers = {}
        if cursor + len(page) < len(out):  # the Hub's paging: a Link header to the next page, cursor in the query
            query = {k: v for k, v in self.query.items() if k != "cursor"} | {"cursor": [str(cursor + len(page))]}
            headers["Link"] = f'<{self.hub.url}/api/models?{urlencode(query, doseq=True)}>; rel="next"'
        self._send_json(200, page, headers)
        return 200

    def _commits(self, repo_id: str, rev: str) -> int:
        """The history from ``rev`` back, newest first (one page: the fixture's histories are short)."""
        repo = self._repo(repo_id)
        oid: str | None = self._commit(repo, rev).oid
        out = []
        while oid is not None:
            c = repo.commits[oid]
            title, _, message = c.message.partition("\n\n")
            out.append({"id": c.oid, "authors": [{"user": "user"}], "date": c.date, "title": title, "message": message})
            oid = c.parent
        self._send_json(200, out)
        return 200

    def _tree(self, repo_id: str, rev: str, folder: str) -> int:
        commit = self._commit(self._repo(repo_id), rev)
        recursive = (self.query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                sub = prefix + rest.split("/")[0]
                entries.setdefault(sub, {"type": "directory", "path": sub, "oid": "0" * 40, "size": 0})
                continue
            entry: dict[str, Any] = {"type": "file", "path": path, "oid": blob.oid, "size": len(blob.data)}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            entries[path] = entry
        if folder and not entries:
            raise HubError(404, f"{folder} does not exist", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        self._send_json(200, list(entries.values()))
        return 200

    def _resolve(self, repo_id: str, rev: str, path: str) -> int:
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._commit(repo, rev)
            blob = commit.files.get(path)
            if blob is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            data = bytes(blob.data)
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if blob.lfs:
                headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(data))})
            name = path.rsplit("/", 1)[-1]
            if blob.lfs and self.hub.redirect_lfs:
                self.hub.lfs.setdefault(blob.sha256, data)
                host = self.hub.url.replace("127.0.0.1", "localhost")  # another host name: not the Hub's
                location = f"{host}/_cdn/{blob.sha256}/{name}"
                self._send(302, b"", {**headers, "Location": location})
                return 302
        return self._serve(data, headers, name)

    def _cdn(self, sha256: str, name: str) -> int:
        with self.hub.lock:
            data = self.hub.lfs.get(sha256)
        if data is None:
            raise HubError(404, "no such object")
        return self._serve(data, {"ETag": f'"cdn-{sha256[:16]}"', "Accept-Ranges": "bytes",
                                  "Content-Type": "application/octet-stream"}, name)

    def _serve(self, data: bytes, headers: dict[str, str], name: str) -> int:
        """A file's bytes (a Range of them), cut where a fault hook says."""
        with self.hub.lock:
            cuts = self.hub.faults.drops.get(name) if self.command == "GET" else None
            cut = cuts.pop(0) if cuts else None
        status, start, end = 200, 0, len(data)
        span = _byte_range(self.headers.get("Range", ""), len(data))
        if span is not None:
            start, end = span
            if start >= end and len(data):
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        if cut is not None:  # full headers, the body up to that byte of the file, then the connection goes away
            part = body[: max(0, cut - start)]
            self._send(status, part, headers, length=len(body))
            self.hub.sent[name] += len(part)
            self.wfile.flush()
            self.close_connection = True
            return status
        self._send(status, body, headers)
        if self.command == "GET":
            self.hub.sent[name] += len(body)
        return status


def _step(method: str, p: list[str], headers: Any) -> str:
    """The name tests/hostile_hub.py gives the request."""
    if p[:2] == ["api", "models"]:
        rest = p[4:]
        if len(p) == 2:
            return "list_models"
        if rest[:1] in (["preupload"], ["commit"], ["commits"], ["tree"]):
            return rest[0]
        return "model_info"
    if p[:3] == ["api", "repos", "create"]:
        return "create"
    if p[:1] == ["_lfs"]:
        return "lfs_put"
    if p[2:4] == ["info", "lfs"]:
        return "lfs_batch"
    if len(p) >= 5 and p[2] == "resolve":
        return "head" if method == "HEAD" else "range" if headers.get("Range") else "get"
    return "other"


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` Range header."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or not any(match.groups()):
        return None
    a, b = match.groups()
    if not a:
        return max(size - int(b), 0), size
    return int(a), min(int(b) + 1, size) if b else size

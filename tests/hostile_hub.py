"""Hostile modes of the local Hub server (tests/hub_server.py): a server that lies, as an attacker's would.

Set ``hub.hostile = Hostile(...)``; the ``hub_env`` fixture resets it. Steps are named after the request:
``list_models``, ``model_info``, ``tree``, ``commits`` (the commit list), ``create``, ``preupload``, ``lfs_batch``,
``lfs_put``, ``commit``,
``head`` and ``get`` (a file under /resolve/), ``range`` (a GET with a Range header).

- ``etag``/``commit``: the ETag (and X-Linked-Etag) or X-Repo-Commit header sent for ``target`` (or every file);
  ``range_etag``: the same on Range GETs only (the HEAD and a plain GET stay honest);
- ``content_length``: the Content-Length declared for ``target`` (the real body is sent, then the connection
  closed); ``get_length``: the same on GET only, sending only that many bytes (HEAD stays honest);
  ``endless``: ``target``'s GET body never ends (chunked; the fixture stops at ``ENDLESS_CAP`` bytes or when the
  client goes away); ``drop_range``: a Range GET of ``target`` is cut after half its bytes; ``ignore_range``:
  a Range GET of ``target`` gets the whole file (200);
- ``fail``: step -> (status, extra headers) answered instead; ``bad_json``: steps answered with a body that
  is not JSON; ``null_sha``: model info with ``"sha": null``; ``models_object``: the model list as an object;
  ``extra_ids``: repo ids added to the model list; ``echo_auth``: error bodies echo the Authorization header.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ENDLESS_CAP = 64 << 20  # an endless body is bounded here, so a client that never stops cannot hang a test


@dataclass
class Hostile:
    target: str | None = None
    etag: str | None = None
    commit: str | None = None
    range_etag: str | None = None
    content_length: int | None = None
    get_length: int | None = None
    endless: bool = False
    drop_range: bool = False
    ignore_range: bool = False
    fail: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    bad_json: set[str] = field(default_factory=set)
    null_sha: bool = False
    models_object: bool = False
    extra_ids: list[str] = field(default_factory=list)
    echo_auth: bool = False
    sent: Counter[str] = field(default_factory=Counter)  # body bytes sent per file name by the lying modes

    def _targets(self, parts: list[str]) -> bool:
        return self.target is None or parts[-1] == self.target

    def handle(self, h: Any, method: str, step: str, parts: list[str]) -> int | None:
        """Answer the request in a hostile way, or return None to let the honest server answer it."""
        if method in ("POST", "PUT") and (step in self.fail or step in self.bad_json):
            h._body()  # read it: the connection is kept alive, and its next request starts after this body
        if step in self.fail and (step not in ("head", "get", "range") or self._targets(parts)):
            status, headers = self.fail[step]
            message = f"hostile answer to {step}"
            if self.echo_auth:
                message += f" (you sent Authorization: {h.headers.get('Authorization')})"
            h._send_json(status, {"error": message}, {"X-Error-Message": message, **headers})
            return status
        if step in self.bad_json:
            h._send(200, b'{"id": "not json', {"Content-Type": "application/json"})
            return 200
        if step == "list_models" and (self.models_object or self.extra_ids):
            listed: list[Any] = [{"id": i, "modelId": i, "sha": "0" * 40, "tags": ["reasoning-vector"]}
                                 for i in self.extra_ids]
            with h.hub.lock:  # then the honest list: the repos with the tags asked for
                for repo in h.hub.repos.values():
                    info = h._summary(repo, repo.commits[repo.branches["main"]])
                    if all(t in info["tags"] for t in h.query.get("filter", [])):
                        listed.append(info)
            h._send_json(200, {"models": listed} if self.models_object else listed)
            return 200
        if step == "model_info" and self.null_sha:
            with h.hub.lock:
                repo = h._repo(f"{parts[2]}/{parts[3]}")
                commit = h._commit(repo, "/".join(parts[5:]) if parts[4:5] == ["revision"] else "main")
                info = h._summary(repo, commit)
                info.update(sha=None, siblings=[{"rfilename": p} for p in sorted(commit.files)])
            h._send_json(200, info)
            return 200
        if step in ("get", "range", "head") and self._targets(parts) and (
            self.endless or self.content_length is not None or (self.drop_range and step == "range")
            or (self.get_length is not None and step == "get") or (self.ignore_range and step == "range")
        ):
            return self._lie_about_body(h, step, parts)
        return None

    def rewrite(self, h: Any, headers: dict[str, str]) -> dict[str, str]:
        """The headers of an honest answer, with the lies of this mode."""
        parts = getattr(h, "parts", [])
        if len(parts) < 5 or parts[2] != "resolve" or not self._targets(parts):
            return headers
        headers = dict(headers)
        if self.etag is not None:
            headers["ETag"] = headers["X-Linked-Etag"] = self.etag
        if self.commit is not None:
            headers["X-Repo-Commit"] = self.commit
        if self.range_etag is not None and h.headers.get("Range") and h.command == "GET":
            headers["ETag"] = headers["X-Linked-Etag"] = self.range_etag
        return headers

    def _lie_about_body(self, h: Any, step: str, parts: list[str]) -> int:
        with h.hub.lock:
            repo = h._repo(f"{parts[0]}/{parts[1]}")
            commit = h._commit(repo, parts[3])
            data = bytes(commit.files["/".join(parts[4:])].data)
        name = parts[-1]
        base = {"X-Repo-Commit": commit.oid, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream"}
        if step == "range" and self.drop_range:
            h.send_response(206)
            for k, v in {**base, "Content-Length": str(len(data)), "Content-Range": f"bytes 0-{len(data) - 1}/"
                         f"{len(data)}"}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return 206
        if step == "range" and self.ignore_range:
            h.send_response(200)
            for k, v in {**base, "Content-Length": str(len(data))}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
            self.sent[name] += len(data)
            return 200
        if step == "get" and self.get_length is not None:
            data = data[: self.get_length]
        if step == "head" or not self.endless:  # a lying Content-Length (HEAD: the size it declares)
            declared = self.content_length if self.content_length is not None else len(data)
            h.send_response(200)
            for k, v in {**base, "Content-Length": str(declared)}.items():
                h.send_header(k, v)
            h.end_headers()
            if step != "head":
                h.wfile.write(data)
                self.sent[name] += len(data)
                h.wfile.flush()
                h.close_connection = True
            return 200
        h.send_response(200)  # endless: chunked, no length, the file over and over
        for k, v in {**base, "Transfer-Encoding": "chunked"}.items():
            h.send_header(k, v)
        h.end_headers()
        h.close_connection = True
        chunk = (data or b"x") * max(1, (64 << 10) // max(len(data), 1))
        try:
            while self.sent[name] < ENDLESS_CAP:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.sent[name] += len(chunk)
        except OSError:  # the client went away: what a bounded client does
            pass
        return 200

"""A minimal Hub-compatible HTTP server on 127.0.0.1 serving one model repo read-only: enough for the real
huggingface_hub client's model_info, get_safetensors_metadata, snapshot_download and Range reads. It counts
the bytes it serves per file, so a test can show that a check never downloads the weights."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubStub:
    def __init__(self, repo_id: str, folder: Path, commit: str) -> None:
        self.repo_id, self.commit = repo_id, commit
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.served: Counter[str] = Counter()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _send(self, code: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(code)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?")[0]
                api = re.fullmatch(rf"/api/models/{re.escape(stub.repo_id)}(/revision/[^/]+)?", path)
                if api:
                    info = {"id": stub.repo_id, "sha": stub.commit,
                            "siblings": [{"rfilename": f} for f in stub.files]}
                    return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                if re.fullmatch(rf"/api/models/{re.escape(stub.repo_id)}/tree/[^/]+", path):
                    tree = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                            for f, d in stub.files.items()]
                    return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                m = re.fullmatch(rf"/{re.escape(stub.repo_id)}/resolve/[^/]+/(.+)", path)
                if not m or m.group(1) not in stub.files:
                    return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound" if m else "RepoNotFound"}, body)
                name, data = m.group(1), stub.files[m.group(1)]
                headers = {"X-Repo-Commit": stub.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Accept-Ranges": "bytes"}
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                code = 200
                if rng:
                    a = int(rng.group(1))
                    b = min(int(rng.group(2)) if rng.group(2) else len(data) - 1, len(data) - 1)
                    headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
                    data, code = data[a : b + 1], 206
                if body:
                    stub.served[name] += len(data)
                self._send(code, data, headers, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

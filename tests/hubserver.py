"""A Hugging Face Hub look-alike on 127.0.0.1, enough for the real huggingface_hub client to download.

Serves repo info, the recursive file tree, and file resolves (HEAD and GET with Range), answers a gated
repo with 401 GatedRepo and an unknown one with 404 RepoNotFound, can throttle file bodies, and records
every request. Used by the tests and by bench/ (python -m tests.hubserver to run it by hand).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool | str = False  # True: a token gets in; "denied": the token's account has not been granted access
    sha: str = ""

    def __post_init__(self) -> None:
        # hashed once: hashing large files per request would make the server, not the client, the bottleneck
        self._sha256 = {path: hashlib.sha256(data).hexdigest() for path, data in self.files.items()}
        self._sha1 = {path: hashlib.sha1(data).hexdigest() for path, data in self.files.items()}
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + bytes.fromhex(self._sha256[path]))
        self.sha = self.sha or digest.hexdigest()

    def etag(self, path: str) -> str:
        return self._sha256[path]


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    bytes_per_second: float | None = None  # throttle file bodies (None: as fast as possible)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    cdn: HubServer | None = None  # when set, file resolves redirect there, as the Hub does for LFS files
    authorizations: list[str | None] = field(default_factory=list)  # Authorization header of each request

    def start(self) -> HubServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each keep-alive response waits ~40 ms for a delayed ACK

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- request handling ---------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(req.path)
        path = unquote(url.path)
        self.requests.append((req.command, path, req.headers.get("Range")))
        self.authorizations.append(req.headers.get("Authorization"))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo = self._repo(req, m.group(1))
            if repo:
                body = {"id": m.group(1), "modelId": m.group(1), "sha": repo.sha, "private": False,
                        "gated": "auto" if repo.gated else False,
                        "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
                self._json(req, body, head)
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            repo = self._repo(req, m.group(1))
            if repo:
                tree = [{"type": "file", "path": p, "size": len(b), "oid": repo._sha1[p],
                         "lfs": {"oid": repo.etag(p), "size": len(b), "pointerSize": 130}}
                        for p, b in sorted(repo.files.items())]
                self._json(req, tree, head)
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo = self._repo(req, m.group(1))
            if repo and self.cdn is not None and m.group(3) in repo.files:
                self._redirect(req, repo, m.group(3), f"{self.cdn.url}{path}")
            elif repo:
                self._file(req, repo, m.group(3), head)
        else:
            self._error(req, 404, "EntryNotFound", "no such route")

    def _repo(self, req, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(req, 404, "RepoNotFound", f"Repository Not Found for url: {req.path}.")
            return None
        if repo.gated and not req.headers.get("Authorization"):
            self._error(req, 401, "GatedRepo",
                        f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.")
            return None
        if repo.gated == "denied":
            self._error(req, 403, "GatedRepo",
                        f"Access to model {repo_id} is restricted and you are not in the authorized list.")
            return None
        return repo

    def _error(self, req, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        req.send_response(status)
        req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", message)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(body)

    def _redirect(self, req, repo: Repo, filename: str, location: str) -> None:
        req.send_response(302)
        req.send_header("Location", location)
        req.send_header("X-Repo-Commit", repo.sha)
        req.send_header("X-Linked-Etag", f'"{repo.etag(filename)}"')
        req.send_header("X-Linked-Size", str(len(repo.files[filename])))
        req.send_header("Content-Length", "0")
        req.end_headers()

    def _json(self, req, value, head: bool) -> None:
        body = json.dumps(value).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def _file(self, req, repo: Repo, filename: str, head: bool) -> None:
        data = repo.files.get(filename)
        if data is None:
            self._error(req, 404, "EntryNotFound", f"{filename} not found")
            return
        start = 0
        range_header = req.headers.get("Range")
        if range_header and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", range_header)):
            start = int(m.group(1))
        status = 206 if start else 200
        req.send_response(status)
        req.send_header("X-Repo-Commit", repo.sha)
        req.send_header("ETag", f'"{repo.etag(filename)}"')
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("Content-Length", str(len(data) - start))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        if head:
            return
        chunk = 64 * 1024
        try:
            for offset in range(start, len(data), chunk):
                req.wfile.write(data[offset:offset + chunk])
                if self.bytes_per_second:
                    time.sleep(chunk / self.bytes_per_second)
        except (BrokenPipeError, ConnectionResetError):
            pass


if __name__ == "__main__":
    import os

    server = HubServer({"demo/tiny": Repo({"config.json": b'{"model_type": "llama"}',
                                           "model.safetensors": os.urandom(50_000_000)})}).start()
    print(f"HF_ENDPOINT={server.url}  (repo demo/tiny); Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()

"""A small Hub-API-compatible HTTP server for tests: the real `huggingface_hub`, `transformers` and
`datasets` clients push to and load from it when `HF_ENDPOINT` points at it (with `HF_HUB_DISABLE_XET=1`).

Implemented (what the clients call, found by reading them and logging their requests):
* repos: `POST /api/repos/create` (private flag, 409 when it exists), `DELETE /api/repos/delete`,
  `GET /api/{type}s/{id}[/revision/{rev}]` (info with sha, siblings, cardData), `GET .../refs`,
  `POST|DELETE .../branch/{name}`, `GET .../commits/{rev}`, `GET /api/whoami-v2`;
* uploads: `POST .../preupload/{rev}` (regular vs LFS by .gitattributes, size and binary content; the
  remote oids), the LFS batch API (`POST /{prefix}{id}.git/info/lfs/objects/batch`, objects per repo)
  with a signed, token-less PUT upload URL and a `.../objects/verify` action, and
  `POST .../commit/{rev}` (NDJSON: file, lfsFile, deletedFile, deletedFolder; `parentCommit`) applied
  atomically; README.md metadata is validated on commit as on the Hub;
* downloads: `GET .../tree/{rev}[/{path}]` (recursive, expand), `POST .../paths-info/{rev}`,
  `HEAD|GET /{prefix}{id}/resolve/{rev}/{path}` with `X-Repo-Commit` and `ETag`; LFS files redirect to
  a "CDN" (the same server under the host name `localhost`, a different host for the client) with
  `X-Linked-Etag`/`X-Linked-Size`, and byte ranges are served (datasets reads parquet by range);
* `POST /api/validate-yaml` (see `hub_card_schema`); auth: `Authorization: Bearer <token>` from
  `HubServer.tokens`, 401 without a valid token for writes and for private repos, 403 outside your
  namespaces. `fail_next(...)` makes chosen requests fail; `requests` logs every request.
Not implemented: pull requests, Xet storage, tags, gated repos, pagination (listings are returned whole).
The handlers live in `hub_api_write.py` and `hub_api_read.py`, the storage model in `hub_store.py`.
Helpers for tests: `client_env(home, token)` (a client process's environment) and `put_files(...)`
(commit files straight into the store).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from hub_api_read import ReadRoutes
from hub_api_write import WriteRoutes
from hub_store import HubError, HubStore, Repo

_T = r"(?P<type>model|dataset|space)s"
_ID = r"(?P<repo>[^/]+/[^/]+?)"
_PREFIX = r"(?:(?P<prefix>datasets|spaces)/)?"


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int


class HubServer:
    """`with HubServer(tokens={"hf_x": ("alice", ["an-org"])}) as hub: hub.endpoint ...`."""

    def __init__(self, tokens: dict[str, tuple[str, list[str]]] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.store = HubStore()
        self.requests: list[tuple[str, str, int]] = []
        self._failures: list[_Failure] = []
        self._secret = hashlib.sha256(str(id(self)).encode()).hexdigest()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}"  # another host name: the client treats it as off-Hub
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail_next(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` `method` requests whose path matches `path_regex` with `status`."""
        self._failures.append(_Failure(method, re.compile(path_regex), status, times))

    def _injected_failure(self, method: str, path: str) -> int | None:
        with self.store.lock:
            for failure in self._failures:
                if failure.times > 0 and failure.method == method and failure.pattern.search(path):
                    failure.times -= 1
                    return failure.status
        return None

    def sign(self, oid: str) -> str:
        return hmac.new(self._secret.encode(), oid.encode(), hashlib.sha256).hexdigest()[:32]

    def client_env(
        self, home: str | os.PathLike[str], token: str | None = None, **extra: str
    ) -> dict[str, str]:
        """The environment of a client process whose Hub is this server: this process's, without any HF_*,
        proxy or transformers variable, plus the endpoint, its own `HF_HOME` (created, empty at first)
        and `token` (none: anonymous)."""
        dropped = ("HF_", "HUGGING", "TRANSFORMERS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith(dropped)}
        env.update(HF_ENDPOINT=self.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(home),
                   HF_MODULES_CACHE=str(Path(home) / "modules"), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost", TOKENIZERS_PARALLELISM="false",
                   PYTHONWARNINGS="ignore", **({"HF_TOKEN": token} if token else {}), **extra)  # fmt: skip
        Path(home).mkdir(parents=True, exist_ok=True)
        return env

    def put_files(
        self, repo_type: str, repo_id: str, files: dict[str, bytes], message: str = "Upload"
    ) -> str:
        """Commit `files` (repo path → bytes) to `main` of a public repo, created if missing, straight into
        the store (no HTTP): `*.safetensors` and `*.whl` as LFS objects, like a push. Returns the commit id."""
        repo = self.store.get(repo_type, repo_id) or self.store.create_repo(repo_type, repo_id, private=False)
        operations = []
        for path, data in sorted(files.items()):
            if path.endswith((".safetensors", ".whl")):
                oid = hashlib.sha256(data).hexdigest()
                self.store.put_lfs_object(repo, oid, data)
                operations.append(("lfsFile", {"path": path, "oid": oid}))
            else:
                operations.append(("file", {"path": path, "content": base64.b64encode(data).decode()}))
        return self.store.commit(repo, "main", operations, message, "", None).oid


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        server_hub = hub

    return Handler


class _HubHandler(ReadRoutes, WriteRoutes, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.server_hub.requests.append((self.command, self.path, status))

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.replace("\n", " ")}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json({"error": err.message}, err.status, headers)

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        status = self.server_hub._injected_failure(self.command, path)
        if status is not None:
            return self._error(HubError(status, f"injected failure of {self.command} {path}"))
        for method, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, path)
            if match and self.command in method.split("|"):
                try:
                    return handler(self, match, body)
                except HubError as err:
                    return self._error(err)
        self._error(HubError(404, f"no route for {self.command} {path}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ------------------------------------------------------------------ auth
    def _user(self) -> tuple[str, list[str]] | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.server_hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.server_hub.tokens[token]

    def _require_user(self) -> tuple[str, list[str]]:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated (a token in the Authorization header) to do this")
        return user

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        repo_id = unquote(repo_id)
        user = self._require_user() if write else self._user()
        repo = self.server_hub.store.get(repo_type, repo_id)
        allowed = user is not None and repo_id.split("/")[0] in (user[0], *user[1])
        if repo is None or (repo.private and not allowed):
            raise HubError(
                401 if user is None else 404, f"Repository Not Found for {repo_id}", "RepoNotFound"
            )
        if write and not allowed:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _type(self, match: re.Match[str]) -> str:
        if "type" in match.groupdict() and match["type"]:
            return match["type"]
        return {"datasets": "dataset", "spaces": "space"}.get(match["prefix"] or "", "model")


_API = rf"/api/{_T}/{_ID}"
_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", r"/api/repos/create", _HubHandler.create_repo),
    ("DELETE", r"/api/repos/delete", _HubHandler.delete_repo),
    ("GET", r"/api/whoami-v2", _HubHandler.whoami),
    ("POST", r"/api/validate-yaml", _HubHandler.validate_yaml),
    ("GET", rf"{_API}/refs", _HubHandler.refs),
    ("POST|DELETE", rf"{_API}/branch/(?P<branch>[^/]+)", _HubHandler.branch),
    ("GET", rf"{_API}/commits/(?P<rev>[^/]+)", _HubHandler.commits),
    ("GET", rf"{_API}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", _HubHandler.tree),
    ("POST", rf"{_API}/paths-info/(?P<rev>[^/]+)", _HubHandler.paths_info),
    ("POST", rf"{_API}/preupload/(?P<rev>[^/]+)", _HubHandler.preupload),
    ("POST", rf"{_API}/commit/(?P<rev>[^/]+)", _HubHandler.commit),
    ("GET", rf"{_API}(?:/revision/(?P<rev>[^/]+))?", _HubHandler.repo_info),
    ("POST", rf"/{_PREFIX}{_ID}\.git/info/lfs/objects/batch", _HubHandler.lfs_batch),
    ("POST", rf"/{_PREFIX}{_ID}\.git/info/lfs/objects/verify", _HubHandler.lfs_verify),
    (
        "PUT",
        rf"/__lfs/upload/(?P<type>model|dataset|space)/{_ID}/(?P<oid>[0-9a-f]{{64}})",
        _HubHandler.lfs_upload,
    ),
    ("GET|HEAD", r"/__cdn/(?P<oid>[0-9a-f]{64})", _HubHandler.cdn),
    ("GET|HEAD", rf"/{_PREFIX}{_ID}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _HubHandler.resolve),
]

__all__ = ["HubServer"]

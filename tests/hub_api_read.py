"""Read side of the test Hub (see hub_server.py): repo info, refs, commit history, tree listings,
paths-info and file resolution (LFS files via a signed "CDN" redirect, byte ranges). A handler mixin."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from hub_store import Blob, Commit, HubError, HubStore, tree_entries


class ReadRoutes:
    """Handlers `(self, match, body)` that only read the Hub's state."""

    def repo_info(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(match["type"], match["repo"])
        commit = repo.resolve(unquote(match["rev"] or "main"))
        card = _card_data(self.server_hub.store, commit)
        siblings = [
            {"rfilename": path, "size": blob.size, "blobId": blob.oid} for path, blob in commit.files.items()
        ]
        info = {"id": repo.repo_id, "_id": repo.repo_id, "author": repo.namespace, "sha": commit.oid,
                "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": list(card.get("tags") or []), "createdAt": repo.created_at, "lastModified": commit.date,
                "siblings": siblings, "cardData": card}  # fmt: skip
        if repo.repo_type == "model":
            info.update(library_name=card.get("library_name"), pipeline_tag=card.get("pipeline_tag"))
        self._json(info)

    def refs(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(match["type"], match["repo"])
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()
        ]
        self._json({"branches": branches, "converts": [], "tags": []})

    def commits(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(match["type"], match["repo"])
        commit: Commit | None = repo.resolve(unquote(match["rev"]))
        history = []
        while commit is not None:
            history.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                            "authors": [{"user": repo.namespace}], "date": commit.date})  # fmt: skip
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(history)

    # ------------------------------------------------------------------ downloads
    def _entry(self, path: str, blob: Blob | None, commit: Commit, expand: bool) -> dict[str, Any]:
        if blob is None:
            tree_oid = hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()
            entry: dict[str, Any] = {"type": "directory", "oid": tree_oid, "path": path}
        else:
            entry = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
            if blob.is_lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        if expand:
            entry["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
        return entry

    def tree(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(match["type"], match["repo"])
        commit = repo.resolve(unquote(match["rev"]))
        query = parse_qs(urlsplit(self.path).query)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
        entries = tree_entries(commit, unquote(match["path"] or ""), recursive)
        self._json([self._entry(path, blob, commit, expand) for path, blob in entries])

    def paths_info(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(match["type"], match["repo"])
        commit = repo.resolve(unquote(match["rev"]))
        if "json" in self.headers.get("Content-Type", ""):
            form = json.loads(body)
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:  # a form: paths=a&paths=b&expand=True
            form = parse_qs(body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[0].lower() in ("1", "true")
        entries = []
        for path in (p.strip("/") for p in ([paths] if isinstance(paths, str) else paths)):
            if path in commit.files:
                entries.append(self._entry(path, commit.files[path], commit, expand))
            elif path == "" or any(p.startswith(path + "/") for p in commit.files):
                entries.append(self._entry(path, None, commit, expand))
        self._json(entries)

    def resolve(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(self._type(match), match["repo"])
        commit = repo.resolve(unquote(match["rev"]))
        path = unquote(match["path"])
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes"}
        if blob.is_lfs:
            oid = str(blob.sha256)
            headers.update({"X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(blob.size),
                            "Location": f"{self.server_hub.cdn}/__cdn/{oid}?sig={self.server_hub.sign(oid)}"})  # fmt: skip
            return self._send(302, headers=headers)
        self._send_range(self.server_hub.store.read(blob), headers)

    def cdn(self, match: re.Match[str], body: bytes) -> None:
        oid = match["oid"]
        if parse_qs(urlsplit(self.path).query).get("sig", [""])[0] != self.server_hub.sign(oid):
            raise HubError(403, "bad or missing URL signature")
        data = self.server_hub.store.lfs_objects.get(oid)
        if data is None:
            raise HubError(404, f"no object {oid}")
        self._send_range(data, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})

    def _send_range(self, data: bytes, headers: dict[str, str]) -> None:
        wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if wanted is None or (not wanted[1] and not wanted[2]):
            return self._send(200, data, {"Content-Type": "application/octet-stream", **headers})
        if wanted[1]:
            start, end = int(wanted[1]), min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
        else:  # a suffix range: the last N bytes
            start, end = max(len(data) - int(wanted[2]), 0), len(data) - 1
        if start >= len(data) or start > end:
            return self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
        headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
        self._send(206, data[start : end + 1], {"Content-Type": "application/octet-stream", **headers})


def _card_data(store: HubStore, commit: Commit) -> dict[str, Any]:
    readme = commit.files.get("README.md")
    if readme is None:
        return {}
    match = re.match(r"\A\s*---\s*\n(.*?)\n---", store.read(readme).decode(errors="replace"), re.DOTALL)
    try:
        data = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}

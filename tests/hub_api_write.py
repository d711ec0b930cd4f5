"""Write side of the test Hub (see hub_server.py): repos, branches, preupload, the LFS batch API and
uploads, NDJSON commits applied atomically, whoami and validate-yaml. A mixin of the request handler."""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hub_card_schema import validate_card_metadata
from hub_store import REPO_TYPES, HubError, is_lfs_path


class WriteRoutes:
    """Handlers `(self, match, body)` that change the Hub's state (or check what would)."""

    def create_repo(self, match: re.Match[str], body: bytes) -> None:
        user = self._require_user()
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or user[0]
        repo_type = payload.get("type") or "model"
        name = payload.get("name", "")
        if repo_type not in REPO_TYPES or not re.fullmatch(r"[\w.-]{1,96}", name) or ".." in name:
            raise HubError(400, f"Invalid repo name or type: {name!r} ({repo_type!r})")
        if namespace not in (user[0], *user[1]):
            raise HubError(403, f"You don't have the rights to create a repo under {namespace!r}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo_id = f"{namespace}/{name}"
        url = f"{self.server_hub.endpoint}/{_url_prefix(repo_type)}{repo_id}"
        try:
            self.server_hub.store.create_repo(repo_type, repo_id, private)
        except HubError as err:  # the Hub's 409 names the existing repo's url
            return self._json(
                {"error": err.message, "url": url}, err.status, {"X-Error-Message": err.message}
            )
        self._json({"url": url, "name": repo_id})

    def delete_repo(self, match: re.Match[str], body: bytes) -> None:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self._require_user()[0]}/{payload.get('name')}"
        repo = self._repo(payload.get("type") or "model", repo_id, write=True)
        self.server_hub.store.delete_repo(repo.repo_type, repo.repo_id)
        self._json({})

    def whoami(self, match: re.Match[str], body: bytes) -> None:
        name, orgs = self._require_user()
        role = {"role": "write", "displayName": "test token"}
        self._json(
            {"type": "user", "name": name, "orgs": [{"name": o} for o in orgs], "auth": {"accessToken": role}}
        )

    def branch(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(match["type"], match["repo"], write=True)
        branch = unquote(match["branch"])
        if self.command == "DELETE":
            self.server_hub.store.delete_branch(repo, branch)
        else:
            self.server_hub.store.create_branch(repo, branch, json.loads(body or b"{}").get("startingPoint"))
        self._json({})

    # ------------------------------------------------------------------ uploads
    def preupload(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(match["type"], match["repo"], write=True)
        store = self.server_hub.store
        files = repo.resolve(unquote(match["rev"])).files
        attributes = files.get(".gitattributes")
        gitattributes = store.read(attributes) if attributes is not None else None
        answers = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item.get("sample", ""))
            lfs = is_lfs_path(item["path"], int(item["size"]), sample, gitattributes)
            existing = files.get(item["path"])
            oid = None if existing is None else (existing.sha256 if existing.is_lfs else existing.oid)
            answers.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})  # fmt: skip
        self._json({"files": answers, "commitOid": repo.resolve(unquote(match["rev"])).oid})

    def lfs_batch(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(self._type(match), match["repo"], write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, f"only the upload operation is supported, got {payload.get('operation')!r}")
        hub, objects = self.server_hub, []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_oids:  # a signed, token-less upload URL, as the Hub's storage gives
                key = f"{repo.repo_type}/{repo.repo_id}/{oid}"
                href = f"{hub.endpoint}/__lfs/upload/{key}?size={size}&sig={hub.sign(key)}"
                verify = (
                    f"{hub.endpoint}/{_url_prefix(repo.repo_type)}{repo.repo_id}.git/info/lfs/objects/verify"
                )
                answer["actions"] = {"upload": {"href": href}, "verify": {"href": verify}}
            objects.append(answer)
        self._json(
            {"transfer": "basic", "objects": objects},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_upload(self, match: re.Match[str], body: bytes) -> None:
        oid, query = match["oid"], parse_qs(urlsplit(self.path).query)
        key = f"{match['type']}/{unquote(match['repo'])}/{oid}"
        if query.get("sig", [""])[0] != self.server_hub.sign(key):
            raise HubError(403, "bad upload signature")
        if int(query.get("size", ["-1"])[0]) != len(body):
            raise HubError(400, f"upload of {oid} has {len(body)} bytes, expected {query.get('size')}")
        repo = self.server_hub.store.get(match["type"], unquote(match["repo"]))
        if repo is None:
            raise HubError(404, f"Repository Not Found for {match['repo']}", "RepoNotFound")
        self.server_hub.store.put_lfs_object(repo, oid, body)
        self._send(200, headers={"ETag": f'"{oid}"'})

    def lfs_verify(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(self._type(match), match["repo"], write=True)
        oid = json.loads(body)["oid"]
        if oid not in repo.lfs_oids:
            raise HubError(404, f"LFS object {oid} was not uploaded to {repo.repo_id}")
        self._json({"success": True})

    def commit(self, match: re.Match[str], body: bytes) -> None:
        repo = self._repo(match["type"], match["repo"], write=True)
        if parse_qs(urlsplit(self.path).query).get("create_pr"):
            raise HubError(400, "pull requests are not implemented by this test server")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        operations = [(line["key"], line["value"]) for line in lines[1:]]
        for key, value in operations:
            if key == "file" and value.get("path") == "README.md":
                errors, _ = validate_card_metadata(
                    base64.b64decode(value["content"]).decode(), repo.repo_type
                )
                if errors:
                    raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
        revision = unquote(match["rev"])
        commit = self.server_hub.store.commit(repo, revision, operations, header.get("summary", ""),
                                              header.get("description", ""), header.get("parentCommit"))  # fmt: skip
        url = f"{self.server_hub.endpoint}/{_url_prefix(repo.repo_type)}{repo.repo_id}/commit/{commit.oid}"
        self._json({"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": "",
                    "pullRequestUrl": None})  # fmt: skip

    def validate_yaml(self, match: re.Match[str], body: bytes) -> None:
        payload = json.loads(body or b"{}")
        errors, warnings = validate_card_metadata(
            str(payload.get("content", "")), payload.get("repoType") or "model"
        )
        response = {
            "errors": [{"message": e} for e in errors],
            "warnings": [{"message": w} for w in warnings],
        }
        self._json(response, 400 if errors else 200)


def _url_prefix(repo_type: str) -> str:
    """How the Hub's web URLs prefix a repo type: nothing for models, `datasets/`, `spaces/`."""
    return "" if repo_type == "model" else f"{repo_type}s/"

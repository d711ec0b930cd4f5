"""In-memory storage behind the test Hub server: repos, branches, commits, blobs and LFS objects.

Only what the Hub's HTTP API exposes is modelled: a commit is a full snapshot of the repo's files, a
branch points to a commit, a regular file is stored inline and an LFS file as a pointer to an object in a
shared content-addressed store (sha256). Every mutation happens under one lock, so a commit is atomic:
it is either fully visible on its branch or not at all.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath

REPO_TYPES = ("model", "dataset", "space")
# what the Hub's default .gitattributes tracks with LFS (abridged), plus its size and binary rules
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gz", "*.h5", "*.joblib", "*.model", "*.msgpack",
    "*.npy", "*.npz", "*.onnx", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors",
    "*.tar", "*.tflite", "*.wasm", "*.zip", "*.zst", "*.png", "*.jpg", "*.jpeg", "*.webp",
)  # fmt: skip
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


class HubError(Exception):
    """An API error: HTTP `status`, a message, and the `X-Error-Code` the client dispatches on."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Blob:
    """A file version: inline `content` (regular file) or the sha256 of an LFS object."""

    size: int
    content: bytes | None = None
    sha256: str | None = None

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def pointer(self) -> bytes:
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
            str(self.sha256).encode(),
            self.size,
        )

    @property
    def oid(self) -> str:
        """The git blob id (of the pointer file for LFS files), as the Hub reports it."""
        return git_blob_sha1(self.pointer if self.is_lfs else (self.content or b""))


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str = field(default_factory=now_iso)
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit:
        """The commit a branch name (`main`, `refs/heads/main`) or a commit id (full or >= 7 chars) names."""
        branch = revision.removeprefix("refs/heads/")
        if branch in self.branches:
            return self.commits[self.branches[branch]]
        matches = [oid for oid in self.commits if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def branch_head(self, revision: str) -> str:
        branch = revision.removeprefix("refs/heads/")
        if branch not in self.branches:
            raise HubError(404, f"Invalid rev id: {revision} is not a branch", "RevisionNotFound")
        return branch


def check_repo_path(path: str) -> str:
    """Reject paths the Hub rejects: absolute, empty segments, `.`/`..`, `.git/`."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def is_lfs_path(path: str, size: int, sample: bytes, gitattributes: bytes | None) -> bool:
    """Whether the Hub would store this file with LFS (attributes pattern, size, or binary content)."""
    patterns = LFS_PATTERNS
    if gitattributes is not None:
        patterns = tuple(
            line.split()[0]
            for line in gitattributes.decode(errors="replace").splitlines()
            if "filter=lfs" in line
        )
    name = PurePosixPath(path).name
    matched = any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)
    return matched or size >= LFS_SIZE_THRESHOLD or b"\0" in sample


class HubStore:
    """All repos and LFS objects of one server; every method is safe to call from request threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self._counter = itertools.count()

    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        with self.lock:
            return self.repos.get((repo_type, repo_id))

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type, repo_id, private)
            initial = self._new_commit(None, "initial commit", "", {".gitattributes": _inline(GITATTRIBUTES)})
            repo.commits[initial.oid] = initial
            repo.branches["main"] = initial.oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            if self.repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        with self.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            if not branch or branch.startswith(("refs/", "/")) or ".." in branch:
                raise HubError(400, f"Invalid branch name: {branch!r}")
            repo.branches[branch] = repo.resolve(starting_point or "main").oid

    def delete_branch(self, repo: Repo, branch: str) -> None:
        with self.lock:
            if branch == "main" or branch not in repo.branches:
                raise HubError(404 if branch != "main" else 403, f"Cannot delete branch {branch!r}")
            del repo.branches[branch]

    def put_lfs_object(self, repo: Repo, sha256: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HubError(400, f"LFS upload does not match its oid {sha256}")
        with self.lock:
            self.lfs_objects[sha256] = data
            repo.lfs_oids.add(sha256)

    def read(self, blob: Blob) -> bytes:
        return blob.content if blob.content is not None else self.lfs_objects[str(blob.sha256)]

    def commit(
        self,
        repo: Repo,
        revision: str,
        operations: list[tuple[str, dict]],
        title: str,
        message: str,
        parent_commit: str | None,
    ) -> Commit:
        """Apply `operations` (`("file"|"lfsFile"|"deletedFile"|"deletedFolder", value)`) as one commit."""
        with self.lock:
            branch = repo.branch_head(revision)
            head = repo.commits[repo.branches[branch]]
            if parent_commit is not None and not head.oid.startswith(parent_commit):
                raise HubError(
                    412, f"A commit has happened since {parent_commit}; the branch head is {head.oid}"
                )
            files = dict(head.files)
            for key, value in operations:
                path = check_repo_path(
                    str(value.get("path", "")).rstrip("/") if "deleted" in key else value.get("path", "")
                )
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")

                    files[path] = _inline(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    oid = value.get("oid")
                    if oid not in repo.lfs_oids:
                        raise HubError(
                            422, f"LFS pointer of {path} points to an object never uploaded ({oid})"
                        )
                    files[path] = Blob(size=len(self.lfs_objects[oid]), sha256=oid)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation key {key!r}")
            commit = self._new_commit(head.oid, title, message, files)
            repo.commits[commit.oid] = commit
            repo.branches[branch] = commit.oid
            return commit

    def _new_commit(self, parent: str | None, title: str, message: str, files: dict[str, Blob]) -> Commit:
        digest = hashlib.sha1(f"{parent}|{title}|{next(self._counter)}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{files[path].oid}".encode())
        return Commit(digest.hexdigest(), parent, title, message, now_iso(), files)


def _inline(data: bytes) -> Blob:
    return Blob(size=len(data), content=data)


def tree_entries(commit: Commit, prefix: str, recursive: bool) -> list[tuple[str, Blob | None]]:
    """`(path, blob)` for files and `(path, None)` for folders under `prefix` ("" = root), sorted."""
    base = prefix.strip("/")
    if base and base in commit.files:
        raise HubError(400, f"{base} is a file, not a folder")
    entries: dict[str, Blob | None] = {}
    for path, blob in commit.files.items():
        if base and not path.startswith(base + "/"):
            continue
        rest = path[len(base) + 1 :] if base else path
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            if recursive or depth == 1:
                entries["/".join(filter(None, [base, *parts[:depth]]))] = None
        if recursive or len(parts) == 1:
            entries[path] = blob
    if base and not entries:
        raise HubError(404, f"{base} does not exist on this revision", "EntryNotFound")
    return sorted(entries.items())

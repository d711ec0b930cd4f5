"""Gallery indexes (from `granalign index`) and their images kept on the Hub, for the Space and the demo.

`locate_index(spec, model)` turns an index argument (`GRANALIGN_INDEX` of `spaces/app.py`) into a local
index file and the folder its images are under:

* an existing local file: used as it is (images as the caller says);
* `hf://[datasets/|spaces/]namespace/name[@revision]/path/to/index.safetensors`: a file in any Hub repo
  (the `huggingface_hub` file-system convention; without a type prefix, a model repo);
* any other relative path, e.g. `gallery.safetensors`: a file in the model's own Hub repo.

For an index on the Hub, the images its item ids name are downloaded with it, as plain files, into
`<HF_HOME>/granalign/galleries/<repo>` (files already there are not fetched again): ids are paths in that
repo, under `image_root` (a folder of the repo; default its root), exactly as `granalign index --images`
stored them. Every image is checked before anything is downloaded. Downloads go through
`huggingface_hub`, so `HF_ENDPOINT`, `HF_TOKEN` (private repos) and `HF_HOME` apply.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .loading import is_local_model

__all__ = ["HUB_PREFIX", "HubFile", "gallery_dir", "locate_index", "parse_hub_file"]

HUB_PREFIX = "hf://"
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_SPEC = "hf://[datasets/|spaces/]namespace/name[@revision]/path/to/index.safetensors"


@dataclass(frozen=True)
class HubFile:
    """A file in a Hub repo, at `revision` (default main)."""

    repo_id: str
    filename: str
    repo_type: str = "model"
    revision: str | None = None

    def __str__(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        revision = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{prefix}{self.repo_id}{revision}/{self.filename}"


def parse_hub_file(spec: str) -> HubFile:
    """`hf://[datasets/|spaces/]namespace/name[@revision]/path` → `HubFile`; `ValueError` if malformed."""
    if not spec.startswith(HUB_PREFIX):
        raise ValueError(f"{spec!r} is not a Hub file: expected {_SPEC}")
    parts = spec[len(HUB_PREFIX) :].split("/")
    repo_type = _TYPES.get(parts[0], "model")
    if parts[0] in _TYPES:
        parts = parts[1:]
    if len(parts) < 3 or not all(parts) or any(part in (".", "..") for part in parts):
        raise ValueError(f"{spec!r} is not a Hub file: expected {_SPEC}")
    name, _, revision = parts[1].partition("@")
    return HubFile(f"{parts[0]}/{name}", "/".join(parts[2:]), repo_type, revision or None)


def gallery_dir(source: HubFile) -> Path:
    """Where the files of `source`'s repo are downloaded: `<HF_HOME>/granalign/galleries/<type>s--ns--name`."""
    from huggingface_hub import constants

    return (
        Path(constants.HF_HOME)
        / "granalign"
        / "galleries"
        / (f"{source.repo_type}s--{source.repo_id.replace('/', '--')}")
    )


def _folder(image_root: str | None) -> str:
    """The repo folder the item ids are relative to, as `a/b/` ('' for the repo root)."""
    if not image_root or image_root.strip("/") in ("", "."):
        return ""
    folder = PurePosixPath(image_root.replace(os.sep, "/"))
    if folder.is_absolute() or ".." in folder.parts:
        raise ValueError(f"image root {image_root!r} must be a folder inside the index's Hub repo")
    return f"{folder}/"


def _image_files(ids: Sequence[str], folder: str, files: set[str], source: HubFile) -> list[str]:
    """The repo file of each item id (as `index_search.resolve_image` finds it locally); names the first
    missing ones in a `FileNotFoundError`."""
    from ..retrieval.encode import IMAGE_EXTENSIONS

    found, missing = [], []
    for item in ids:
        path = PurePosixPath(item)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"index item id {item!r} is not a path inside the Hub repo {source.repo_id!r}")
        base = f"{folder}{path}"
        candidates = [base] + ([] if path.suffix else [base + extension for extension in IMAGE_EXTENSIONS])
        match = next((candidate for candidate in candidates if candidate in files), None)
        (found if match else missing).append(match or item)
    if missing:
        where = f"under {folder!r} " if folder else ""
        raise FileNotFoundError(
            f"the {source.repo_type} repo {source.repo_id!r} has no image {where}for {len(missing)} of the "
            f"index's {len(ids)} items (e.g. {missing[:3]}); upload them, or set the image root "
            "(GRANALIGN_IMAGE_ROOT) to the repo folder the ids are relative to"
        )
    return found


def _download(source: HubFile, image_root: str | None) -> tuple[Path, Path]:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from ..retrieval.index import GalleryIndex
    from .push import hub_connection

    folder = _folder(image_root)
    api = HfApi()
    where = f"index {str(source)!r}"
    with hub_connection(api.endpoint):
        try:
            info = api.repo_info(source.repo_id, repo_type=source.repo_type, revision=source.revision)
            files = set(api.list_repo_files(source.repo_id, repo_type=source.repo_type, revision=info.sha))
        except RepositoryNotFoundError:
            raise FileNotFoundError(
                f"{where}: {api.endpoint} has no {source.repo_type} repo {source.repo_id!r} "
                "(or the token cannot read it)"
            ) from None
        except RevisionNotFoundError:
            raise FileNotFoundError(
                f"{where}: the repo {source.repo_id!r} has no revision {source.revision!r}"
            ) from None
        if source.filename not in files:
            raise FileNotFoundError(
                f"{where}: the {source.repo_type} repo {source.repo_id!r} has no file {source.filename!r}"
            )
        target = gallery_dir(source)

        def fetch(filename: str) -> Path:
            return Path(hf_hub_download(source.repo_id, filename, repo_type=source.repo_type,
                                        revision=info.sha, local_dir=target))  # fmt: skip

        index_file = fetch(source.filename)
        images = _image_files(GalleryIndex.read_ids(index_file), folder, files, source)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(fetch, images))
    return index_file, target / folder


def locate_index(
    spec: str | os.PathLike[str], model: str, image_root: str | None = None, *, revision: str | None = None
) -> tuple[Path, Path | None]:
    """The local index file that `spec` names and the folder its item ids are relative to.

    `model` is the model argument (a Hub repo id or a local directory; `revision` its Hub revision): a
    relative `spec` that is not a local file is looked up in its repo. For a local index the folder is
    `image_root` as given (None: the ids are used as stored); for a Hub index it is that folder of the
    downloaded repo (see the module docstring).
    """
    text = str(spec)
    if not text.startswith(HUB_PREFIX) and Path(text).expanduser().is_file():
        return Path(text).expanduser(), None if image_root is None else Path(image_root)
    if text.startswith(HUB_PREFIX):
        source = parse_hub_file(text)
    elif is_local_model(model) or Path(text).is_absolute() or text.startswith(("~", ".")):
        why = f"the model {model!r} is a local directory" if is_local_model(model) else "it is a local path"
        raise FileNotFoundError(
            f"index {text!r} is not a file here, nor a file of the model's Hub repo ({why}); "
            f"an index in another Hub repo looks like {_SPEC}"
        )
    else:
        source = HubFile(model, text.replace(os.sep, "/"), "model", revision)
    return _download(source, image_root)

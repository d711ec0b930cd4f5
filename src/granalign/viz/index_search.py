"""The demo's search tab over a gallery index built by `granalign index` (`granalign demo --index`).

`IndexImageSearch` loads the index with the model (refusing an index another model built), encodes each
query with `encode_captions` and ranks with `granalign.retrieval.search`. Item ids are the image paths
for `granalign index --images`; other ids (e.g. a dataset's `image_id`) are looked up under `image_root`,
as given or with an image extension. Every image is located on construction, so a missing one is an
error before the server starts.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from ..processing_granalign import open_image
from ..retrieval.encode import IMAGE_EXTENSIONS, encode_captions
from ..retrieval.index import GalleryIndex
from ..retrieval.search import DEFAULT_SHORTLIST, MODES, search
from .scene_gallery import SearchHit

__all__ = ["IndexImageSearch", "resolve_image"]


def resolve_image(item_id: str, image_root: str | os.PathLike | None = None) -> Path:
    """The image file of an index item: its id as a path (under `image_root` if given, else as stored).

    The server shows these files, so an index cannot point it elsewhere: an id with a `..` component is
    refused, and with `image_root` so is an absolute id or one whose file (symlinks resolved) lies
    outside the root.
    """
    relative = Path(item_id)
    if ".." in relative.parts:
        raise ValueError(
            f"index item id {item_id!r} contains '..'; the demo serves only the index's own images"
        )
    if image_root is not None and relative.is_absolute():
        raise ValueError(f"index item id {item_id!r} is absolute; with an image root, ids are paths under it")
    path = Path(image_root) / relative if image_root is not None else relative
    candidates = [path] + ([] if path.suffix else [path.with_name(path.name + e) for e in IMAGE_EXTENSIONS])
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        option = "check" if image_root is not None else "pass"
        raise FileNotFoundError(
            f"no image file {str(path)!r} for index item {item_id!r}; {option} --image-root "
            "(GRANALIGN_IMAGE_ROOT): the folder the index's item ids are relative to"
        )
    if image_root is not None and not found.resolve().is_relative_to(Path(image_root).resolve()):
        raise ValueError(f"index item {item_id!r} resolves outside the image root {str(image_root)!r}")
    return found


class IndexImageSearch:
    """Text → image search over a saved image index (`mode`/`shortlist` as in `retrieval.search`)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        index: str | os.PathLike | GalleryIndex,
        image_root: str | os.PathLike | None = None,
        mode: str = "two-stage",
        shortlist: int = DEFAULT_SHORTLIST,
        lock: threading.Lock | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; expected one of {MODES}")
        if isinstance(index, GalleryIndex):
            index.check_model(model)
        self.index = index if isinstance(index, GalleryIndex) else GalleryIndex.load(index, model=model)
        if self.index.modality != "image":
            raise ValueError(f"the demo searches images, but this index holds {self.index.modality}s")
        self.paths = [resolve_image(item, image_root) for item in self.index.ids]
        self.model, self.processor, self.mode, self.shortlist = model, processor, mode, shortlist
        self.lock = lock or threading.Lock()

    def search(self, query: str, top_k: int = 5) -> list[SearchHit]:
        """The `top_k` indexed images with the highest GRM score for `query`, best first."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"the search query is empty ({query!r}); type a caption to search for")
        device = next(self.model.parameters()).device
        with self.lock:
            queries = encode_captions(self.model, self.processor, [query.strip()], progress=False)
            result = search(
                self.model, self.index, queries, k=top_k, mode=self.mode, shortlist=self.shortlist,
                device=device, check_model=False,  # checked once, on construction
            )  # fmt: skip
        hits = []
        for score, row, item in zip(result.scores[0], result.indices[0], result.ids[0], strict=True):
            hits.append(SearchHit(open_image(self.paths[int(row)]), item, float(score)))
        return hits

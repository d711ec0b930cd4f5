"""The on-disk cache of rendered PNGs, keyed by the SVG's content hash and the renderer's fingerprint.

Layout under a source's cache folder: `render-<size>px-<fp>/png/<h[:2]>/<h>.png` per SVG content hash
`h`, and `render-<size>px-<fp>/index.json` mapping each hash to `{"pixels": hash}` or to the
`{"error": message}` (plus `"timeout"`) of a failed render, so failures are not retried (a file stopped
at a timeout is retried with a longer one). `<fp>` is `svg_render.renderer_fingerprint`. JSON files are
written atomically, and the index is merged with what a concurrent call added meanwhile.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .svg_render import pixel_hash

RunJobs = Callable[[Sequence[tuple[str, str]]], list[dict[str, Any]]]
"""Renders `(svg_path, png_path)` jobs; one result per job (see `render_pool.render_in_workers`)."""


def default_cache_dir(name: str) -> Path:
    """`$GRANALIGN_CACHE/<name>`, or `~/.cache/granalign/<name>` when the variable is unset."""
    root = os.environ.get("GRANALIGN_CACHE")
    return Path(root) / name if root else Path.home() / ".cache" / "granalign" / name


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON atomically (tmp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RenderCache:
    """The PNGs of one renderer fingerprint and image size under `cache_dir`."""

    def __init__(self, cache_dir: Path, image_size: int, fingerprint: str) -> None:
        self.folder = cache_dir / f"render-{image_size}px-{fingerprint}"
        self.index_path = self.folder / "index.json"
        self.index: dict[str, dict[str, Any]] = read_json(self.index_path) or {}

    def png_path(self, digest: str) -> Path:
        return self.folder / "png" / digest[:2] / f"{digest}.png"

    def missing(self, sources: Iterable[tuple[str, str]], timeout: float) -> dict[str, str]:
        """`{content hash: svg path}` of the `(hash, svg path)` sources still to render, first path per hash.

        A hash rendered before, failed before, or stopped at this timeout (or a longer one) is not
        listed. A PNG without an index entry (written by an interrupted call) is indexed, not re-rendered.
        """
        todo: dict[str, str] = {}
        for digest, svg_path in sources:
            known = self.index.get(digest)
            if known and "pixels" in known and self.png_path(digest).is_file():
                continue
            if known and "error" in known and known.get("timeout", timeout) >= timeout:
                continue  # a failure (or a timeout at this limit or a longer one) is not retried
            if not known and self.png_path(digest).is_file():  # rendered by an interrupted call
                with Image.open(self.png_path(digest)) as image:
                    self.index[digest] = {"pixels": pixel_hash(image.convert("RGB"))}
                continue
            todo.setdefault(digest, svg_path)
        return todo

    def render(self, todo: Mapping[str, str], run: RunJobs) -> None:
        """Render `todo` (from `missing`) with `run` and record the results in the index."""
        if not todo:
            return
        digests = list(todo)
        jobs = [(os.fspath(todo[d]), os.fspath(self.png_path(d))) for d in digests]
        for digest, result in zip(digests, run(jobs), strict=True):
            self.index[digest] = result
        merged = read_json(self.index_path) or {}  # keep what a concurrent call added meanwhile
        merged.update(self.index)
        write_json(self.index_path, merged)

    def result(self, digest: str) -> dict[str, Any]:
        """The index entry of a rendered (or failed) hash."""
        return self.index[digest]

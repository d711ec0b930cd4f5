"""Open Clip Art Library SVGs from Debian's `openclipart-svg` package, rendered to PNG, as a caption dataset.

The package puts about 7,458 SVG files (plus 663 symlinks, skipped as duplicates) under
`/usr/share/openclipart/svg/`. Each file carries RDF metadata; the caption of a file is the `dc:description`
of its `cc:Work` block when that has more than 3 words and is no Perl artefact such as `HASH(0x8a0e4d0)`,
else its `dc:title` (whitespace normalised); files with neither (62 lack a title, one of them has a long
description) are skipped and counted "without title". Titles repeat heavily (whole icon collections share
one), so at most `max_per_caption` images are kept per caption (compared case- and whitespace-insensitively),
chosen in a fixed order: the SHA-256 of the relative path.

The selected files are rendered with `cairosvg` at the fixed scale `RENDER_SCALE` in `num_proc` worker
processes (forked where the platform allows, so they start at once) with a per-file timeout, cropped to the
bounding box of what was drawn, composited on white, resized (long side = `image_size`) and padded to a
white `image_size` square. Files cairosvg cannot render (about 1%: percent sizes, `0.8;` values, external
bitmaps, gradient-only files) or that take longer than `render_timeout` are skipped; so are exact
duplicates (same caption, same pixels). Rows are split by caption: each unique caption goes to
train/validation/test by a hash of `(split_seed, caption)`, so all images of a caption share a split and no
test caption is seen in training. With the defaults: about 2,990 rows (2,380 / 310 / 300) and 2,570
unique captions, median 2 words.

Rendering the ~3,300 selected files takes 2-3 minutes on 2 cores, so PNGs are cached in
`cache_dir/render-<size>px-<fp>/`, where `<fp>` fingerprints the renderer settings, library versions,
`image_size` and `RENDER_VERSION`; a metadata manifest (per file: size, mtime, content hash, caption) is
cached next to it. A second call renders nothing and takes about a second. Installed fonts are not part of
the fingerprint: clear the cache after changing them. Every render equals a fresh-process render: cairo's
static font caches are reset after each file.

The rendering (`svg_render`), the worker processes (`render_pool`), the PNG cache (`render_cache`) and the
cap / duplicate / split steps (`caption_splits`) are shared with the OpenMoji source (`openmoji`); this
module holds what is particular to Open Clip Art: the folder scan, the RDF captions and the render scale.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from PIL import Image

from . import render_cache, svg_render
from .caption_splits import (
    Candidate,
    check_selection_options,
    fixed_order,
    select_render_split,
)
from .captions import caption_key, normalize_caption
from .checks import resolve_splits
from .render_cache import RenderCache, read_json, write_json
from .render_pool import check_render_options, render_in_workers
from .reporting import report
from .schema import SPLITS, validate_dataset_dict
from .svg_render import prepare_svg

__all__ = [
    "DEFAULT_SVG_ROOT",
    "OPENCLIPART",
    "caption_key",
    "choose_caption",
    "default_cache_dir",
    "load_openclipart",
    "read_caption",
    "render_files",
    "render_square",
    "renderer_fingerprint",
]

logger = logging.getLogger(__name__)

DEFAULT_SVG_ROOT = "/usr/share/openclipart/svg"
OPENCLIPART = "openclipart"
"""The source name that selects this loader with the default `svg_root` (see `load_alignment_dataset`)."""

RENDER_VERSION = 2
"""Bump when rendering or post-processing changes, so cached PNGs are not reused."""
MANIFEST_VERSION = 1
"""Bump when caption extraction changes, so cached manifests are re-parsed."""

RENDER_SCALE = 2.0
"""Device pixels per SVG user unit (96 dpi). A fixed scale keeps line widths comparable across files."""
MAX_RENDER_PIXELS = 32_000_000
"""Pages larger than this at `RENDER_SCALE` are rendered at the largest scale that fits (memory guard)."""
MIN_DESCRIPTION_WORDS = 4
"""A `dc:description` is used as the caption from this many words on; shorter ones fall back to the title."""

_INSTALL_HINT = (
    "install Debian's openclipart-svg package (`apt-get install openclipart-svg`, or without root "
    "`apt-get download openclipart-svg && dpkg -x openclipart-svg_*.deb DIR`, then pass "
    "svg_root='DIR/usr/share/openclipart/svg')"
)
_PERL_ARTEFACT = re.compile(r"\b(?:HASH|ARRAY|SCALAR|CODE|GLOB|REF)\(0x[0-9a-fA-F]+\)")
_DC = "{http://purl.org/dc/elements/1.1/}"


def default_cache_dir() -> Path:
    """`$GRANALIGN_CACHE/openclipart`, or `~/.cache/granalign/openclipart` when the variable is unset."""
    return render_cache.default_cache_dir(OPENCLIPART)


def _text(element: Any) -> str:
    return normalize_caption("".join(element.itertext())) if element is not None else ""


def choose_caption(title: str, description: str) -> str | None:
    """The caption of a file: its description when it has more than 3 words and is no Perl artefact
    (`HASH(0x...)`), else its title; None when that is empty or an artefact too."""
    description, title = normalize_caption(description), normalize_caption(title)
    if len(description.split()) >= MIN_DESCRIPTION_WORDS and not _PERL_ARTEFACT.search(description):
        return description
    if not title or _PERL_ARTEFACT.fullmatch(title):
        return None
    return title


def read_caption(data: bytes) -> str | None:
    """The caption of an SVG document (`choose_caption` of its first `cc:Work` block); None without title.

    Raises the XML parser's error for a malformed document.
    """
    from defusedxml.ElementTree import iterparse

    for _, element in iterparse(io.BytesIO(data), events=("end",)):
        if element.tag.endswith("}Work"):
            return choose_caption(
                _text(element.find(f"{_DC}title")), _text(element.find(f"{_DC}description"))
            )
    return None


# --------------------------------------------------------------------------------------------- rendering


def renderer_fingerprint(image_size: int) -> str:
    """A short hash of everything that decides the rendered pixels (settings, library versions, size)."""
    return svg_render.renderer_fingerprint(
        image_size,
        version=RENDER_VERSION,
        scale=RENDER_SCALE,
        max_pixels=MAX_RENDER_PIXELS,
        source=OPENCLIPART,
    )


def render_square(data: bytes, image_size: int) -> Image.Image:
    """`data` (an SVG document) as a white-background RGB image of `image_size` x `image_size`:
    rendered at `RENDER_SCALE`, cropped to what was drawn, long side resized to `image_size`, centred
    on white (`svg_render.render_square`)."""
    return svg_render.render_square(data, image_size, scale=RENDER_SCALE, max_pixels=MAX_RENDER_PIXELS)


def _render_file(svg_path: str, png_path: str, image_size: int) -> tuple[str, str]:
    """Render one file to `png_path` (atomically); `("ok", pixel hash)` or `("error", message)`."""
    return svg_render.render_file(
        svg_path, png_path, image_size, scale=RENDER_SCALE, max_pixels=MAX_RENDER_PIXELS
    )


def _progress(done: int, total: int) -> None:
    report(logger, "openclipart: rendered %d of %d files", done, total)


def render_files(
    jobs: Sequence[tuple[str, str]], image_size: int, num_proc: int, timeout: float
) -> list[dict[str, Any]]:
    """Render `(svg_path, png_path)` jobs in `num_proc` worker processes, each file within `timeout` s.

    Returns per job `{"pixels": hash}` or `{"error": message}` (plus `"timeout"` for a file stopped at
    the limit). A worker that times out or dies is killed and replaced.
    """
    return render_in_workers(jobs, _render_file, image_size, num_proc, timeout, _progress)


# ------------------------------------------------------------------------------------------------ caching


def _list_svgs(root: Path) -> tuple[dict[str, os.stat_result], int]:
    """`({relative path: stat}, number of symlinks skipped)` of the `.svg` files under `root`, sorted."""
    files: dict[str, os.stat_result] = {}
    links = 0
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if not name.lower().endswith(".svg"):
                continue
            path = os.path.join(folder, name)
            if os.path.islink(path):
                links += 1
                continue
            files[Path(os.path.relpath(path, root)).as_posix()] = os.stat(path)
    return files, links


def _scan(root: Path, cache_dir: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Per file `{size, mtime_ns, sha256, caption, error}` (cached; only changed files are re-read)."""
    files, links = _list_svgs(root)
    if not files:
        raise FileNotFoundError(f"{str(root)!r} holds no .svg files; {_INSTALL_HINT}")
    root_key = hashlib.sha256(os.fspath(root.resolve()).encode()).hexdigest()[:12]
    manifest_path = cache_dir / f"manifest-v{MANIFEST_VERSION}-{root_key}.json"
    cached = read_json(manifest_path)
    old = cached.get("files", {}) if isinstance(cached, dict) else {}
    entries: dict[str, dict[str, Any]] = {}
    changed = 0
    for relpath, stat in files.items():
        entry = old.get(relpath)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            entries[relpath] = entry
            continue
        changed += 1
        data = (root / relpath).read_bytes()
        entry = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        try:
            entry["caption"] = read_caption(prepare_svg(data))
        except (SyntaxError, ValueError, OSError) as error:  # malformed XML (ParseError), bad gzip
            entry["caption"], entry["error"] = None, f"{type(error).__name__}: {error}"[:300]
        entries[relpath] = entry
    if changed or len(old) != len(entries):
        write_json(manifest_path, {"svg_root": os.fspath(root.resolve()), "files": entries})
    return entries, links


@dataclass
class _Counts:
    found: int = 0
    symlinks: int = 0
    unreadable: int = 0
    without_title: int = 0


def load_openclipart(
    svg_root: str | os.PathLike = DEFAULT_SVG_ROOT,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    max_per_caption: int | None = 5,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    fold: int | None = None,
    num_folds: int = 10,
    render_timeout: float = 10.0,
    limit: int | None = None,
    num_proc: int = 2,
    splits: Sequence[str] | None = None,
) -> DatasetDict:
    """Load the Open Clip Art SVGs under `svg_root` as rendered images with one caption each.

    Args:
        svg_root: the SVG folder of Debian's `openclipart-svg` (or any folder of SVGs with RDF metadata).
        cache_dir: where PNGs and the metadata manifest are cached; default `default_cache_dir()`.
        image_size: side of the square PNGs.
        max_per_caption: most images kept per caption (case/whitespace-insensitive); None keeps all.
        split_fractions: shares of the unique captions in (train, validation, test).
        split_seed: seed of the caption -> split hash.
        fold, num_folds: k-fold splits instead of `split_fractions`: the captions fall into `num_folds`
            equal hash buckets; bucket `fold` is test, the next one validation, the rest train. Over all
            folds every caption is tested exactly once (cross-validation for a small test split).
        render_timeout: seconds one file may take to render; slower files are skipped (and remembered).
        limit: keep only the first `limit` selected files in the fixed order (quick runs, tests).
        num_proc: render worker processes.
        splits: schema splits to return; all by default.

    Logs one summary line at INFO (files found, skipped and why, rows per split); printed to stderr when
    INFO logging is off. The image column holds paths of PNGs in the cache, decoded on access.
    """
    selection = check_selection_options(max_per_caption, limit, split_fractions, split_seed, fold, num_folds)
    check_render_options(image_size, num_proc, render_timeout)
    root = Path(svg_root)
    if not root.is_dir():
        raise FileNotFoundError(f"openclipart SVG folder {str(root)!r} does not exist; {_INSTALL_HINT}")
    wanted = resolve_splits(SPLITS, splits, f"openclipart {root}")
    fingerprint = renderer_fingerprint(image_size)  # needs cairosvg: checked before anything is cached
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    counts = _Counts()
    entries, counts.symlinks = _scan(root, cache_root)
    counts.found = len(entries)

    # caption per file, then the per-caption cap in the fixed order
    candidates: list[Candidate] = []
    for relpath in sorted(entries, key=fixed_order):
        entry = entries[relpath]
        if entry.get("error"):
            counts.unreadable += 1
        elif not entry.get("caption"):
            counts.without_title += 1
        else:
            candidates.append(Candidate(relpath, entry["caption"], entry["sha256"]))
    result, outcome = select_render_split(
        candidates,
        lambda candidate: os.fspath(root / candidate.image_id),
        RenderCache(cache_root, image_size, fingerprint),
        lambda jobs: render_files(jobs, image_size, num_proc, render_timeout),
        selection,
        render_timeout=render_timeout,
        wanted=wanted,
        source=OPENCLIPART,
        location=root,
        logger=logger,
    )
    report(
        logger,
        "openclipart %s: %d SVG files (%d symlinks skipped), %d unreadable, %d without title, %s",
        root,
        counts.found,
        counts.symlinks,
        counts.unreadable,
        counts.without_title,
        outcome.summary(),
    )
    return validate_dataset_dict(result)

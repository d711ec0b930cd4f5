"""The OpenMoji emoji set (npm `openmoji`, CC-BY-SA 4.0), rendered to PNG, as a caption dataset.

`npm install openmoji` puts the package under `node_modules/openmoji/` (or `npm pack openmoji && tar xzf
openmoji-*.tgz` under `package/`). Its `data/openmoji.json` lists 4,495 emoji (version 17.0.0), each with
a `hexcode` (the SVG is `color/svg/<hexcode>.svg`), a `group`, an `annotation` and `tags`.

Caption: the Unicode CLDR-style `annotation` (whitespace normalised), by default alone. Annotations are
compositional, which is what word-region alignment is for: "men wrestling: medium-light skin tone, light
skin tone", "couple with heart: woman, man, medium-light skin tone, medium-dark skin tone", "woman: dark
skin tone, curly hair" (median 4 words). Tags are left out by default because they are keyword lists
rather than descriptions, and because only base emoji carry them (a skin-tone variant has none), so
they would make the captions of one emoji family differ in kind; `caption="annotation+tags"` appends the
`tags` and `openmoji_tags` keywords (`"grinning face, cheerful, cheery, ..."`) all the same.

Entries of the `component` group (the five skin-tone swatches and four hair-style components, which are
no emoji of their own) are skipped, and so are entries without annotation or whose SVG is missing; all
are counted in the summary line. At most `max_per_caption` images are kept per caption (case- and
whitespace-insensitive, in the fixed order of the SHA-256 of the hexcode; a few annotations such as
"brain" occur twice, once as Unicode emoji and once as an OpenMoji extra).

Rendering is `svg_render`'s (cairosvg, crop to the drawing, white background, long side resized to
`image_size`, padded to a square) at a scale that depends on `image_size`: `image_size / EMOJI_UNITS`
device pixels per SVG unit, at least `MIN_RENDER_SCALE`, so that an emoji's drawing (most span 50-64 of
the 72 units of the OpenMoji page) comes out at least `image_size` wide and is scaled down, not up.
Duplicates (same caption, same pixels) are dropped; rows are split by caption exactly as in
`openclipart` (`caption_splits`): train/validation/test by a hash of `(split_seed, caption)`, or k folds.
With the defaults: about 4,480 rows and unique captions.

PNGs are cached in `cache_dir/render-<size>px-<fp>/` (`render_cache`; `<fp>` fingerprints the renderer
settings, library versions, `image_size` and `RENDER_VERSION`). The first call renders all ~4,490 SVGs
(a few minutes on 2 cores); a later one only hashes the SVG files (about a second).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from . import render_cache, svg_render
from .caption_splits import (
    Candidate,
    check_selection_options,
    fixed_order,
    select_render_split,
)
from .captions import caption_key, normalize_caption
from .checks import resolve_splits
from .render_cache import RenderCache
from .render_pool import check_render_options, render_in_workers
from .reporting import report
from .schema import SPLITS, validate_dataset_dict

logger = logging.getLogger(__name__)

OPENMOJI = "openmoji"
"""The source name that selects this loader with the default package folder (see `load_alignment_dataset`)."""
DEFAULT_PACKAGE = "node_modules/openmoji"
"""Where `npm install openmoji` puts the package, relative to the folder it ran in."""
METADATA = "data/openmoji.json"
SVG_FOLDER = "color/svg"

RENDER_VERSION = 1
"""Bump when rendering or post-processing changes, so cached PNGs are not reused."""
EMOJI_UNITS = 56
"""SVG units (of the 72-unit OpenMoji page) that cover `image_size` pixels: the render scale is
`image_size / EMOJI_UNITS`, so drawings (mostly 50-64 units) are rendered at least that large."""
MIN_RENDER_SCALE = 2.0
MAX_RENDER_PIXELS = 32_000_000
"""Pages larger than this are rendered at the largest scale that fits (memory guard)."""
SKIPPED_GROUPS = ("component",)
"""Groups that hold no emoji of their own: skin-tone swatches and hair-style components."""
CAPTIONS = ("annotation", "annotation+tags")
"""The caption choices: the annotation alone (default), or followed by the tag keywords."""

_INSTALL_HINT = (
    "install the OpenMoji package with `npm install openmoji` (then the source is node_modules/openmoji), "
    "or without a project `npm pack openmoji && tar xzf openmoji-*.tgz` (then the source is package/)"
)


def default_cache_dir() -> Path:
    """`$GRANALIGN_CACHE/openmoji`, or `~/.cache/granalign/openmoji` when the variable is unset."""
    return render_cache.default_cache_dir(OPENMOJI)


def render_scale(image_size: int) -> float:
    """Device pixels per SVG unit for PNGs of `image_size` (see `EMOJI_UNITS`)."""
    return max(MIN_RENDER_SCALE, image_size / EMOJI_UNITS)


def renderer_fingerprint(image_size: int) -> str:
    """A short hash of everything that decides the rendered pixels (settings, library versions, size)."""
    return svg_render.renderer_fingerprint(
        image_size,
        version=RENDER_VERSION,
        scale=render_scale(image_size),
        max_pixels=MAX_RENDER_PIXELS,
        source=OPENMOJI,
    )


def _render_file(svg_path: str, png_path: str, image_size: int) -> tuple[str, str]:
    """Render one emoji to `png_path` (atomically); `("ok", pixel hash)` or `("error", message)`."""
    return svg_render.render_file(
        svg_path, png_path, image_size, scale=render_scale(image_size), max_pixels=MAX_RENDER_PIXELS
    )


def _progress(done: int, total: int) -> None:
    report(logger, "openmoji: rendered %d of %d files", done, total)


def render_files(
    jobs: Sequence[tuple[str, str]], image_size: int, num_proc: int, timeout: float
) -> list[dict[str, Any]]:
    """Render `(svg_path, png_path)` jobs in `num_proc` worker processes, each file within `timeout` s."""
    return render_in_workers(jobs, _render_file, image_size, num_proc, timeout, _progress)


def _keywords(text: Any) -> list[str]:
    return [normalize_caption(word) for word in str(text or "").split(",") if word.strip()]


def make_caption(entry: dict[str, Any], caption: str = "annotation") -> str:
    """The caption of an `openmoji.json` entry: its annotation, with `"annotation+tags"` followed by its
    `tags` and `openmoji_tags` keywords (comma-separated, each once, none equal to the annotation)."""
    annotation = normalize_caption(str(entry.get("annotation") or ""))
    if caption == "annotation" or not annotation:
        return annotation
    seen = {caption_key(annotation)}
    words = [annotation]
    for word in _keywords(entry.get("tags")) + _keywords(entry.get("openmoji_tags")):
        if caption_key(word) not in seen:
            seen.add(caption_key(word))
            words.append(word)
    return ", ".join(words)


def read_entries(package: Path) -> list[dict[str, Any]]:
    """The entries of `package/data/openmoji.json`; `FileNotFoundError` with the install command when the
    package folder, the metadata file or the SVG folder is missing, `ValueError` when it is no list."""
    metadata, svgs = package / METADATA, package / SVG_FOLDER
    for path, what in ((package, "package folder"), (metadata, "metadata file"), (svgs, "SVG folder")):
        if not path.exists():
            raise FileNotFoundError(
                f"OpenMoji {what} {str(path)!r} does not exist (expected an unpacked npm package with "
                f"{METADATA} and {SVG_FOLDER}/); {_INSTALL_HINT}"
            )
    entries = json.loads(metadata.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "hexcode" in e for e in entries):
        raise ValueError(f"{str(metadata)!r} is not a list of emoji entries with a 'hexcode' each")
    return entries


@dataclass
class _Counts:
    entries: int = 0
    skipped_groups: int = 0
    without_svg: int = 0
    without_annotation: int = 0


def load_openmoji(
    source: str | os.PathLike = DEFAULT_PACKAGE,
    *,
    splits: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    max_per_caption: int | None = 5,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    fold: int | None = None,
    num_folds: int = 10,
    caption: str = "annotation",
    render_timeout: float = 10.0,
    limit: int | None = None,
    num_proc: int = 2,
) -> DatasetDict:
    """Load the OpenMoji package at `source` as rendered emoji with one caption each.

    Args:
        source: the unpacked npm package (`node_modules/openmoji`, or `package/` of `npm pack`).
        splits: schema splits to return; all by default.
        cache_dir: where PNGs are cached; default `default_cache_dir()`.
        image_size: side of the square PNGs.
        max_per_caption: most images kept per caption (case/whitespace-insensitive); None keeps all.
        split_fractions: shares of the unique captions in (train, validation, test).
        split_seed: seed of the caption -> split hash.
        fold, num_folds: k-fold splits instead of `split_fractions`: the captions fall into `num_folds`
            equal hash buckets; bucket `fold` is test, the next one validation, the rest train. Over all
            folds every caption is tested exactly once.
        caption: `"annotation"` (default) or `"annotation+tags"` (see `make_caption`).
        render_timeout: seconds one file may take to render; slower files are skipped (and remembered).
        limit: keep only the first `limit` selected emoji in the fixed order (quick runs, tests).
        num_proc: render worker processes.

    Logs one summary line at INFO (entries, skipped and why, rows per split); printed to stderr when
    INFO logging is off. The `image_id` is the hexcode; the image column holds paths of cached PNGs.
    """
    selection = check_selection_options(max_per_caption, limit, split_fractions, split_seed, fold, num_folds)
    check_render_options(image_size, num_proc, render_timeout)
    if caption not in CAPTIONS:
        raise ValueError(f"caption must be one of {CAPTIONS}, got {caption!r}")
    package = Path(source)
    entries = read_entries(package)
    wanted = resolve_splits(SPLITS, splits, f"openmoji {package}")
    fingerprint = renderer_fingerprint(image_size)  # needs cairosvg: checked before anything is cached
    counts = _Counts(entries=len(entries))

    candidates: list[Candidate] = []
    svg_paths: dict[str, str] = {}
    for entry in sorted(entries, key=lambda e: fixed_order(str(e["hexcode"]))):
        hexcode = str(entry["hexcode"])
        if entry.get("group") in SKIPPED_GROUPS:
            counts.skipped_groups += 1
            continue
        text = make_caption(entry, caption)
        if not text:
            counts.without_annotation += 1
            continue
        svg_path = package / SVG_FOLDER / f"{hexcode}.svg"
        try:
            data = svg_path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            counts.without_svg += 1
            continue
        digest = hashlib.sha256(data).hexdigest()
        svg_paths.setdefault(digest, os.fspath(svg_path))
        candidates.append(Candidate(hexcode, text, digest))
    result, outcome = select_render_split(
        candidates,
        lambda candidate: svg_paths[candidate.digest],
        RenderCache(
            Path(cache_dir) if cache_dir is not None else default_cache_dir(), image_size, fingerprint
        ),
        lambda jobs: render_files(jobs, image_size, num_proc, render_timeout),
        selection,
        render_timeout=render_timeout,
        wanted=wanted,
        source=OPENMOJI,
        location=package,
        logger=logger,
    )
    report(
        logger,
        "openmoji %s: %d entries, %d skipped (group %s), %d without SVG, %d without annotation, %s",
        package,
        counts.entries,
        counts.skipped_groups,
        "/".join(SKIPPED_GROUPS),
        counts.without_svg,
        counts.without_annotation,
        outcome.summary(),
    )
    return validate_dataset_dict(result)

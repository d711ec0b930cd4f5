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
"""

from __future__ import annotations

import functools
import gc
import gzip
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict
from PIL import Image

from .captions import caption_key, normalize_caption
from .checks import build_image_split, resolve_splits
from .schema import SPLITS, validate_dataset_dict

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
_DOCTYPE = re.compile(rb"<!DOCTYPE\s[^\[>]*\[(?P<subset>.*?)\]\s*>", re.DOTALL)
_ENTITY = re.compile(
    rb"<!ENTITY\s+(?P<name>[A-Za-z_][\w.-]*)\s+(?:\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)'|(?P<ext>SYSTEM|PUBLIC)\b[^>]*)\s*>"
)
_MAX_ENTITY_DEPTH = 8
_PROGRESS_EVERY = 500


def default_cache_dir() -> Path:
    """`$GRANALIGN_CACHE/openclipart`, or `~/.cache/granalign/openclipart` when the variable is unset."""
    root = os.environ.get("GRANALIGN_CACHE")
    return Path(root) / OPENCLIPART if root else Path.home() / ".cache" / "granalign" / OPENCLIPART


def expand_internal_entities(data: bytes) -> bytes:
    """`data` with the DOCTYPE's internal entities (`<!ENTITY ns_svg "...">`, as Adobe Illustrator writes)
    substituted and the internal subset removed, so a parser that refuses entities can read it.

    External entities (`SYSTEM`/`PUBLIC`) are never resolved: their references become empty. Parameter
    entities are ignored. Raises `ValueError` when expansion nests too deep or grows the file tenfold.
    """
    doctype = _DOCTYPE.search(data)
    if doctype is None:
        return data
    values: dict[bytes, bytes] = {}
    for entity in _ENTITY.finditer(doctype.group("subset")):
        value = b"" if entity.group("ext") else entity.group("dq") or entity.group("sq") or b""
        values.setdefault(entity.group("name"), value)
    body = data[: doctype.start()] + data[doctype.end() :]
    if not values:
        return body
    pattern = re.compile(rb"&(" + b"|".join(re.escape(name) for name in values) + rb");")
    limit = 10 * len(data) + 4096
    for _ in range(_MAX_ENTITY_DEPTH):
        body, count = pattern.subn(lambda match: values[match.group(1)], body)
        if len(body) > limit:
            raise ValueError(f"internal entities expand past {limit} bytes")
        if not count:
            return body
    raise ValueError(f"internal entities nest deeper than {_MAX_ENTITY_DEPTH} levels")


def prepare_svg(data: bytes) -> bytes:
    """The bytes of an SVG (or gzipped SVGZ) document, unzipped, with internal entities expanded."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return expand_internal_entities(data)


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


def _report(message: str, *args: Any) -> None:
    """Log at INFO; print to stderr when INFO is not enabled (progress of a minutes-long first call)."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(message, *args)
    else:
        print(message % args, file=sys.stderr, flush=True)


def _fixed_order(relpath: str) -> str:
    return hashlib.sha256(relpath.encode("utf-8")).hexdigest()


def assign_split(
    caption: str,
    split_seed: int,
    split_fractions: Sequence[float],
    fold: int | None = None,
    num_folds: int = 10,
) -> str:
    """The split of every image with this caption, from a hash of `(split_seed, caption_key(caption))`.

    With `fold`, the hash puts each caption in one of `num_folds` equal buckets instead of the fractions:
    bucket `fold` is the test split, bucket `fold + 1` (mod `num_folds`) the validation split and the rest
    train, so the test splits of folds `0 .. num_folds - 1` are disjoint and hold every caption once."""
    digest = hashlib.sha256(f"{split_seed}\0{caption_key(caption)}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    if fold is not None:
        bucket = int(point * num_folds)
        return "test" if bucket == fold else "validation" if bucket == (fold + 1) % num_folds else "train"
    total = 0.0
    for split, fraction in zip(SPLITS, split_fractions, strict=True):
        total += fraction
        if point < total:
            return split
    return next(s for s, f in zip(reversed(SPLITS), reversed(split_fractions), strict=True) if f > 0)


# --------------------------------------------------------------------------------------------- rendering


def _require_cairosvg() -> Any:
    """The `cairosvg` module, or an `ImportError` naming the extra that installs it."""
    try:
        import cairocffi
        import cairosvg
    except (ImportError, OSError) as error:  # OSError: cairocffi finds no libcairo2
        raise ImportError(
            f"the openclipart source renders SVGs with cairosvg + cairocffi ({error}); "
            "install them with `pip install 'granalign[real]'` (and Debian's libcairo2)"
        ) from None
    return cairosvg, cairocffi


def renderer_fingerprint(image_size: int) -> str:
    """A short hash of everything that decides the rendered pixels (settings, library versions, size)."""
    cairosvg, cairocffi = _require_cairosvg()
    import PIL

    settings = {
        "version": RENDER_VERSION,
        "scale": RENDER_SCALE,
        "max_pixels": MAX_RENDER_PIXELS,
        "image_size": image_size,
        "cairosvg": cairosvg.__version__,
        "cairo": cairocffi.cairo_version_string(),
        "pillow": PIL.__version__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class _PageTooLarge(Exception):
    def __init__(self, width: float, height: float) -> None:
        super().__init__(f"page of {width:.0f}x{height:.0f} px")
        self.pixels = width * height


@functools.cache
def _surface_class() -> type:
    """cairosvg's PNG surface, refusing pages over `MAX_RENDER_PIXELS` before allocating them."""
    from cairosvg.surface import PNGSurface

    class BoundedSurface(PNGSurface):
        def _create_surface(self, width: float, height: float) -> Any:
            if width * height > MAX_RENDER_PIXELS:
                raise _PageTooLarge(width, height)
            return super()._create_surface(width, height)

    return BoundedSurface


def _rasterize(data: bytes) -> Any:
    """`data` rendered at `RENDER_SCALE`, cropped to the bounding box of its non-transparent pixels and
    composited on white: an `[H, W, 3]` `uint8` array, or None when nothing is drawn.

    A page larger than `MAX_RENDER_PIXELS` at that scale (some declare 20,000+ px) is rendered at the
    largest scale that fits instead.
    """
    from cairosvg.parser import Tree

    tree = Tree(bytestring=data)
    try:
        surface = _surface_class()(tree, None, 96, scale=RENDER_SCALE)
    except _PageTooLarge as page:  # raised before anything is drawn: the tree is untouched
        scale = RENDER_SCALE * math.sqrt(MAX_RENDER_PIXELS / page.pixels) * 0.99
        surface = _surface_class()(tree, None, 96, scale=scale)
    image = surface.cairo
    image.flush()
    width, height, stride = image.get_width(), image.get_height(), image.get_stride()
    pixels = np.frombuffer(image.get_data(), dtype=np.uint8).reshape(height, stride)[:, : 4 * width]
    pixels = pixels.reshape(height, width, 4)
    # cairo's ARGB32 pixels are native-endian 32-bit words: bytes B, G, R, A on little-endian machines
    order = [2, 1, 0, 3] if sys.byteorder == "little" else [1, 2, 3, 0]
    alpha = pixels[..., order[3]]
    rows, cols = np.flatnonzero(alpha.max(axis=1)), np.flatnonzero(alpha.max(axis=0))
    crop = None
    if len(rows):
        crop = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1][..., order]
        alpha = crop[..., 3:]
        # premultiplied colour over white: c * a + 255 * (1 - a) = c_premultiplied + 255 - a (<= 255)
        crop = np.minimum(crop[..., :3], alpha) + (255 - alpha)
    del pixels, alpha, surface
    image.finish()
    return crop


def render_square(data: bytes, image_size: int) -> Image.Image:
    """`data` (an SVG document) as a white-background RGB image of `image_size` x `image_size`:
    rendered, cropped to what was drawn, long side resized to `image_size`, centred on white.

    Raises `ValueError` when the document draws nothing, and cairosvg's errors when it cannot render.
    """
    rgb = _rasterize(data)
    if rgb is None:
        raise ValueError("the SVG draws nothing visible")
    image = Image.fromarray(rgb, "RGB")
    scale = image_size / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    square = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    square.paste(image, ((image_size - size[0]) // 2, (image_size - size[1]) // 2))
    return square


def _pixel_hash(image: Any) -> str:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def _tmp_path(path: str, pid: int) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{pid}.tmp")


def _render_file(svg_path: str, png_path: str, image_size: int) -> tuple[str, str]:
    """Render one file to `png_path` (atomically); `("ok", pixel hash)` or `("error", message)`."""
    tmp = _tmp_path(png_path, os.getpid())
    try:
        image = render_square(prepare_svg(Path(svg_path).read_bytes()), image_size)
        os.makedirs(os.path.dirname(png_path), exist_ok=True)
        image.save(tmp, format="PNG")
        os.replace(tmp, png_path)
        return "ok", _pixel_hash(image)
    except Exception as error:  # cairosvg raises many types on malformed input
        if os.path.exists(tmp):
            os.remove(tmp)
        return "error", f"{type(error).__name__}: {error}"[:300]


def _worker(conn: Connection, image_size: int) -> None:
    """Worker loop: say "ready", then render `(svg_path, png_path)` jobs until `None`, resetting cairo's
    static caches (fonts) after each file so every render equals a fresh-process render."""
    _, cairocffi = _require_cairosvg()
    gc.freeze()  # what the worker inherited (torch, datasets, ...) is not rescanned by each gc.collect()
    conn.send(("ready", ""))
    while True:
        job = conn.recv()
        if job is None:
            return
        result = _render_file(*job, image_size)
        gc.collect()  # every cairo object must be gone before the reset
        cairocffi.cairo.cairo_debug_reset_static_data()
        conn.send(result)


def _context() -> Any:
    """`fork` where available: workers start at once, without re-importing the (slow) package."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


@dataclass
class _Slot:
    process: Any
    conn: Connection
    index: int | None = None  # the job being rendered
    started: float = 0.0


def _start_worker(context: Any, image_size: int) -> _Slot:
    parent, child = context.Pipe()
    process = context.Process(target=_worker, args=(child, image_size), daemon=True)
    process.start()
    child.close()
    if not parent.poll(120) or parent.recv()[0] != "ready":
        process.kill()
        raise RuntimeError("an SVG render worker did not start within 120 s")
    return _Slot(process, parent)


def render_files(
    jobs: Sequence[tuple[str, str]], image_size: int, num_proc: int, timeout: float
) -> list[dict[str, Any]]:
    """Render `(svg_path, png_path)` jobs in `num_proc` worker processes, each file within `timeout` s.

    Returns per job `{"pixels": hash}` or `{"error": message}` (plus `"timeout"` for a file stopped at
    the limit). A worker that times out or dies is killed and replaced.
    """
    context = _context()
    pending = deque(range(len(jobs)))
    results: list[dict[str, Any]] = [{} for _ in jobs]
    slots: list[_Slot] = []
    done = 0

    def discard(slot: _Slot) -> None:
        slot.process.kill()
        slot.process.join()
        slot.conn.close()
        if slot.index is not None:  # a half-written PNG of the killed worker
            tmp = _tmp_path(jobs[slot.index][1], slot.process.pid)
            if os.path.exists(tmp):
                os.remove(tmp)
        slots.remove(slot)

    try:
        while pending or any(slot.index is not None for slot in slots):
            while pending and len(slots) < num_proc and sum(s.index is None for s in slots) < len(pending):
                slots.append(_start_worker(context, image_size))
            for slot in slots:
                if slot.index is None and pending:
                    slot.index, slot.started = pending.popleft(), time.monotonic()
                    slot.conn.send(jobs[slot.index])
            busy = [slot for slot in slots if slot.index is not None]
            deadline = min(slot.started for slot in busy) + timeout
            ready = wait([slot.conn for slot in busy], timeout=max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            for slot in busy:
                index = slot.index
                if slot.conn in ready:
                    try:
                        status, value = slot.conn.recv()
                    except (EOFError, OSError):
                        slot.process.join(timeout=1)
                        results[index] = {"error": f"render worker died (exit code {slot.process.exitcode})"}
                        discard(slot)
                    else:
                        results[index] = {"pixels": value} if status == "ok" else {"error": value}
                        slot.index = None
                elif now - slot.started >= timeout:
                    results[index] = {"error": f"timed out after {timeout:g} s", "timeout": timeout}
                    discard(slot)
                else:
                    continue
                done += 1
                if done % _PROGRESS_EVERY == 0:
                    _report("openclipart: rendered %d of %d files", done, len(jobs))
    finally:
        for slot in list(slots):
            if slot.index is None:
                try:
                    slot.conn.send(None)
                    slot.process.join(timeout=5)
                except OSError:
                    pass
            discard(slot)
    return results


# ------------------------------------------------------------------------------------------------ caching


def _write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON atomically (tmp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    cached = _read_json(manifest_path)
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
        _write_json(manifest_path, {"svg_root": os.fspath(root.resolve()), "files": entries})
    return entries, links


@dataclass
class _Counts:
    found: int = 0
    symlinks: int = 0
    unreadable: int = 0
    without_title: int = 0
    capped: int = 0
    selected: int = 0
    rendered_now: int = 0
    failed: int = 0
    timeouts: int = 0
    duplicates: int = 0
    rows: dict[str, int] = field(default_factory=dict)


def _check_args(
    image_size: int,
    max_per_caption: int | None,
    split_fractions: Sequence[float],
    render_timeout: float,
    limit: int | None,
    num_proc: int,
    fold: int | None = None,
    num_folds: int = 10,
) -> tuple[float, ...]:
    """Validate the options; return the split fractions as floats."""
    if not isinstance(num_folds, int) or isinstance(num_folds, bool) or num_folds < 3:
        raise ValueError(
            f"num_folds must be an int >= 3 (test, validation and train folds), got {num_folds!r}"
        )
    if fold is not None and (
        not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < num_folds
    ):
        raise ValueError(
            f"fold must be None or an int in [0, {num_folds}) (num_folds={num_folds}), got {fold!r}"
        )
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if max_per_caption is not None and (not isinstance(max_per_caption, int) or max_per_caption < 1):
        raise ValueError(f"max_per_caption must be an int >= 1 or None, got {max_per_caption!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be an int >= 1, got {num_proc!r}")
    if not render_timeout > 0:
        raise ValueError(f"render_timeout must be > 0 seconds, got {render_timeout!r}")
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"split_fractions must be {len(SPLITS)} non-negative numbers (train, validation, test) "
            f"summing to 1, got {split_fractions!r}"
        )
    return fractions


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
    fractions = _check_args(
        image_size, max_per_caption, split_fractions, render_timeout, limit, num_proc, fold, num_folds
    )
    root = Path(svg_root)
    if not root.is_dir():
        raise FileNotFoundError(f"openclipart SVG folder {str(root)!r} does not exist; {_INSTALL_HINT}")
    wanted = resolve_splits(SPLITS, splits, f"openclipart {root}")
    fingerprint = renderer_fingerprint(image_size)  # needs cairosvg: checked before anything is cached
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    counts = _Counts()
    entries, counts.symlinks = _scan(root, cache)
    counts.found = len(entries)

    # caption per file, then the per-caption cap in the fixed order
    per_caption: dict[str, int] = {}
    selected: list[tuple[str, str, str]] = []  # (relpath, caption, content hash)
    for relpath in sorted(entries, key=_fixed_order):
        entry = entries[relpath]
        if entry.get("error"):
            counts.unreadable += 1
            continue
        if not entry.get("caption"):
            counts.without_title += 1
            continue
        key = caption_key(entry["caption"])
        if max_per_caption is not None and per_caption.get(key, 0) >= max_per_caption:
            counts.capped += 1
            continue
        per_caption[key] = per_caption.get(key, 0) + 1
        selected.append((relpath, entry["caption"], entry["sha256"]))
    if limit is not None:
        selected = selected[:limit]
    counts.selected = len(selected)

    # render what the cache lacks
    render_dir = cache / f"render-{image_size}px-{fingerprint}"
    index_path = render_dir / "index.json"
    index: dict[str, dict[str, Any]] = _read_json(index_path) or {}

    def png_path(digest: str) -> Path:
        return render_dir / "png" / digest[:2] / f"{digest}.png"

    todo: dict[str, str] = {}  # content hash -> relpath
    for relpath, _, digest in selected:
        known = index.get(digest)
        if known and "pixels" in known and png_path(digest).is_file():
            continue
        if known and "error" in known and known.get("timeout", render_timeout) >= render_timeout:
            continue  # a failure (or a timeout at this limit or a longer one) is not retried
        if not known and png_path(digest).is_file():  # rendered by an interrupted call
            with Image.open(png_path(digest)) as image:
                index[digest] = {"pixels": _pixel_hash(image.convert("RGB"))}
            continue
        todo.setdefault(digest, relpath)
    if todo:
        _report("openclipart: rendering %d files into %s", len(todo), render_dir)
        digests = list(todo)
        jobs = [(os.fspath(root / todo[d]), os.fspath(png_path(d))) for d in digests]
        for digest, result in zip(
            digests, render_files(jobs, image_size, num_proc, render_timeout), strict=True
        ):
            index[digest] = result
        merged = _read_json(index_path) or {}  # keep what a concurrent call added meanwhile
        merged.update(index)
        _write_json(index_path, merged)
    counts.rendered_now = len(todo)

    # drop failures and exact duplicates, then split by caption
    seen: set[str] = set()
    columns: dict[str, tuple[list[str], list[str], list[list[str]]]] = {s: ([], [], []) for s in SPLITS}
    for relpath, caption, digest in selected:
        result = index[digest]
        if "pixels" not in result:
            counts.failed += 1
            counts.timeouts += "timeout" in result
            continue
        key = hashlib.sha256(f"{caption_key(caption)}\0{result['pixels']}".encode()).hexdigest()
        if key in seen:
            counts.duplicates += 1
            continue
        seen.add(key)
        ids, paths, captions = columns[assign_split(caption, split_seed, fractions, fold, num_folds)]
        ids.append(relpath)
        paths.append(os.fspath(png_path(digest)))
        captions.append([caption])

    result = DatasetDict()
    for split in wanted:
        ids, paths, captions = columns[split]
        counts.rows[split] = len(ids)
        result[split] = build_image_split(ids, paths, captions, f"openclipart {root} [{split}]")
    _report(
        "openclipart %s: %d SVG files (%d symlinks skipped), %d unreadable, %d without title, "
        "%d capped away (max %s per caption), %d selected, %d rendered now, %d render failures "
        "(%d timeouts), %d duplicates dropped; rows: %s",
        root,
        counts.found,
        counts.symlinks,
        counts.unreadable,
        counts.without_title,
        counts.capped,
        max_per_caption,
        counts.selected,
        counts.rendered_now,
        counts.failed,
        counts.timeouts,
        counts.duplicates,
        ", ".join(f"{split}={n}" for split, n in counts.rows.items()),
    )
    return validate_dataset_dict(result)

"""One SVG document to one square PNG with cairosvg: the pixels every SVG source of ours trains on.

A document is rendered at a fixed `scale` (device pixels per SVG user unit at 96 dpi), cropped to the
bounding box of what was drawn, composited on white, resized (long side = `image_size`) and padded to a
white `image_size` square. A page larger than `max_pixels` at that scale is rendered at the largest scale
that fits (a memory guard). `reset_static_caches` after each file makes every render equal a
fresh-process render (cairo keeps static font caches). `renderer_fingerprint` hashes everything that
decides the pixels, for cache keys (`render_cache`).
"""

from __future__ import annotations

import functools
import gc
import gzip
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_DOCTYPE = re.compile(rb"<!DOCTYPE\s[^\[>]*\[(?P<subset>.*?)\]\s*>", re.DOTALL)
_ENTITY = re.compile(
    rb"<!ENTITY\s+(?P<name>[A-Za-z_][\w.-]*)\s+(?:\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)'|(?P<ext>SYSTEM|PUBLIC)\b[^>]*)\s*>"
)
_MAX_ENTITY_DEPTH = 8


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


def require_cairosvg(source: str = "SVG") -> tuple[Any, Any]:
    """The `cairosvg` and `cairocffi` modules, or an `ImportError` naming the extra that installs them."""
    try:
        import cairocffi
        import cairosvg
    except (ImportError, OSError) as error:  # OSError: cairocffi finds no libcairo2
        raise ImportError(
            f"the {source} source renders SVGs with cairosvg + cairocffi ({error}); "
            "install them with `pip install 'granalign[real]'` (and Debian's libcairo2)"
        ) from None
    return cairosvg, cairocffi


def renderer_fingerprint(
    image_size: int, *, version: int, scale: float, max_pixels: int, source: str = "SVG"
) -> str:
    """A short hash of everything that decides the rendered pixels (settings, library versions, size).

    `version` is the caller's render version, bumped when its rendering or post-processing changes.
    """
    cairosvg, cairocffi = require_cairosvg(source)
    import PIL

    settings = {
        "version": version,
        "scale": scale,
        "max_pixels": max_pixels,
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
    """cairosvg's PNG surface, refusing pages over `max_pixels` before allocating them."""
    from cairosvg.surface import PNGSurface

    class BoundedSurface(PNGSurface):
        def __init__(self, tree: Any, *, scale: float, max_pixels: int) -> None:
            self.max_pixels = max_pixels
            super().__init__(tree, None, 96, scale=scale)

        def _create_surface(self, width: float, height: float) -> Any:
            if width * height > self.max_pixels:
                raise _PageTooLarge(width, height)
            return super()._create_surface(width, height)

    return BoundedSurface


def rasterize(data: bytes, scale: float, max_pixels: int) -> Any:
    """`data` rendered at `scale`, cropped to the bounding box of its non-transparent pixels and
    composited on white: an `[H, W, 3]` `uint8` array, or None when nothing is drawn.

    A page larger than `max_pixels` at that scale (some declare 20,000+ px) is rendered at the largest
    scale that fits instead.
    """
    from cairosvg.parser import Tree

    tree = Tree(bytestring=data)
    try:
        surface = _surface_class()(tree, scale=scale, max_pixels=max_pixels)
    except _PageTooLarge as page:  # raised before anything is drawn: the tree is untouched
        smaller = scale * math.sqrt(max_pixels / page.pixels) * 0.99
        surface = _surface_class()(tree, scale=smaller, max_pixels=max_pixels)
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


def render_square(data: bytes, image_size: int, *, scale: float, max_pixels: int) -> Image.Image:
    """`data` (an SVG document) as a white-background RGB image of `image_size` x `image_size`:
    rendered at `scale`, cropped to what was drawn, long side resized to `image_size`, centred on white.

    Raises `ValueError` when the document draws nothing, and cairosvg's errors when it cannot render.
    """
    rgb = rasterize(data, scale, max_pixels)
    if rgb is None:
        raise ValueError("the SVG draws nothing visible")
    image = Image.fromarray(rgb, "RGB")
    factor = image_size / max(image.size)
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    square = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    square.paste(image, ((image_size - size[0]) // 2, (image_size - size[1]) // 2))
    return square


def pixel_hash(image: Any) -> str:
    """A hash of an image's mode, size and pixels (exact-duplicate detection)."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def tmp_path(path: str, pid: int) -> str:
    """Where process `pid` writes `path` before renaming it into place."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{pid}.tmp")


def render_file(
    svg_path: str, png_path: str, image_size: int, *, scale: float, max_pixels: int
) -> tuple[str, str]:
    """Render one file to `png_path` (atomically); `("ok", pixel hash)` or `("error", message)`."""
    tmp = tmp_path(png_path, os.getpid())
    try:
        data = prepare_svg(Path(svg_path).read_bytes())
        image = render_square(data, image_size, scale=scale, max_pixels=max_pixels)
        os.makedirs(os.path.dirname(png_path), exist_ok=True)
        image.save(tmp, format="PNG")
        os.replace(tmp, png_path)
        return "ok", pixel_hash(image)
    except Exception as error:  # cairosvg raises many types on malformed input
        if os.path.exists(tmp):
            os.remove(tmp)
        return "error", f"{type(error).__name__}: {error}"[:300]


def reset_static_caches() -> None:
    """Drop cairo's process-wide static data (font caches), after collecting every cairo object, so the
    next render equals a fresh-process render."""
    _, cairocffi = require_cairosvg()
    gc.collect()  # every cairo object must be gone before the reset
    cairocffi.cairo.cairo_debug_reset_static_data()

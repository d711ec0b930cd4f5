"""One entry point for every data source: `load_alignment_dataset(source, kind=None, **kwargs)`."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from .hub_schemas import convert_hub_dataset, detect_hub_schema, load_raw_dataset
from .imagefolder import METADATA_FILES, load_imagefolder
from .karpathy import load_karpathy
from .openclipart import DEFAULT_SVG_ROOT, OPENCLIPART, load_openclipart
from .openmoji import DEFAULT_PACKAGE, OPENMOJI, load_openmoji
from .precomputed import convert_region_dataset, load_precomp, load_region_dataset

KINDS: tuple[str, ...] = ("karpathy", "hub", "imagefolder", "precomp", "regions", "openclipart", "openmoji")
"""Source kinds: Karpathy JSON + image root, Hub id / Hub-layout or saved dir, HF image folder,
SCAN/VSE∞ precomp folder, dataset with a region-feature array column, folder of Open Clip Art SVGs
(Debian's `openclipart-svg`; never detected, select it with `kind="openclipart"` or source `"openclipart"`),
the OpenMoji npm package folder (detected by its `data/openmoji.json`; source `"openmoji"` stands for
`node_modules/openmoji`)."""

_HUB_OPTIONS = frozenset(inspect.signature(convert_hub_dataset).parameters) - {"raw", "source"}
_REGION_OPTIONS = frozenset(inspect.signature(convert_region_dataset).parameters) - {
    "raw",
    "source",
    "splits",
}


def detect_kind(source: str | os.PathLike) -> str:
    """Guess the kind of `source` from what the path holds (`KINDS`).

    A `.json` file is a Karpathy split file; a folder with `*_ims.npy` is precomp; a folder with
    `data/openmoji.json` is the OpenMoji package; a folder with a metadata file (top level or one
    sub-folder down) and no saved dataset is an image folder; any other folder or a non-local name is
    a Hub dataset.
    """
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "karpathy"
        raise ValueError(
            f"{os.fspath(source)!r} is a file; the only file source is a Karpathy .json split file "
            "(pass a folder or Hub id otherwise)"
        )
    if not path.is_dir():
        return "hub"
    if next(path.glob("*_ims.npy"), None) is not None:
        return "precomp"
    if (path / "data" / "openmoji.json").is_file():
        return OPENMOJI
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "hub"
    for name in METADATA_FILES:
        if (path / name).is_file() or next(path.glob(f"*/{name}"), None) is not None:
            return "imagefolder"
    return "hub"


def _load_hub_or_regions(source: str | os.PathLike, kwargs: dict[str, Any]) -> DatasetDict:
    """A Hub-style source: image-caption schemas, or our region schema found by its columns."""
    if _REGION_OPTIONS & set(kwargs):
        return load_region_dataset(source, **kwargs)
    options = {name: kwargs.pop(name) for name in list(kwargs) if name in _HUB_OPTIONS}
    raw = load_raw_dataset(source, **kwargs)
    name = os.fspath(source)
    if len(raw) and detect_hub_schema(next(iter(raw.values())).column_names) == "regions":
        extra = sorted(set(options) - {"splits"})
        if extra:
            raise ValueError(f"{name} holds region features; option(s) {extra} apply to image datasets only")
        return convert_region_dataset(raw, splits=options.get("splits"), source=name)
    return convert_hub_dataset(raw, source=name, **options)


def _load_openclipart(source: str | os.PathLike, kwargs: dict[str, Any]) -> DatasetDict:
    """The source is the SVG folder; the name `"openclipart"` stands for Debian's `DEFAULT_SVG_ROOT`."""
    if "svg_root" in kwargs:
        raise ValueError(
            f"kind 'openclipart' takes the SVG folder as the source ({os.fspath(source)!r}), "
            f"not as svg_root={kwargs['svg_root']!r}"
        )
    root = DEFAULT_SVG_ROOT if os.fspath(source) == OPENCLIPART else source
    return load_openclipart(root, **kwargs)


def _load_openmoji(source: str | os.PathLike, kwargs: dict[str, Any]) -> DatasetDict:
    """The source is the package folder; the name `"openmoji"` stands for `DEFAULT_PACKAGE`."""
    package = DEFAULT_PACKAGE if os.fspath(source) == OPENMOJI else source
    return load_openmoji(package, **kwargs)


def load_alignment_dataset(source: str | os.PathLike, kind: str | None = None, **kwargs: Any) -> DatasetDict:
    """Load any supported source into the dataset schema (see docs/design.md).

    `kind` is one of `KINDS`, or None to detect it (`detect_kind`). `kwargs` go to the loader of that
    kind: `load_karpathy` (`image_root`, `include_restval`, ...), `load_hub_dataset` (`image_root`, plus
    `datasets.load_dataset` arguments such as `revision`), `load_imagefolder` (`caption_column`,
    `single_split`, ...), `load_precomp` (`test_split`, ...), `load_region_dataset` (`features_column`,
    `boxes_column`, ...), `load_openclipart` and `load_openmoji` (`cache_dir`, `image_size`,
    `max_per_caption`, ...). All accept `splits`. The source `"openclipart"` (with kind None or
    `"openclipart"`) is the Open Clip Art SVGs of Debian's `openclipart-svg` at
    `/usr/share/openclipart/svg`; any other source with `kind="openclipart"` is a folder of such SVGs.
    The source `"openmoji"` is the npm package at `node_modules/openmoji` (`npm install openmoji`); any
    other source with `kind="openmoji"` is such a package folder (`package/` of `npm pack openmoji`).

    Examples:
        >>> load_alignment_dataset("dataset_coco.json", image_root="coco/")  # doctest: +SKIP
        >>> load_alignment_dataset("nlphuji/flickr30k", revision="refs/convert/parquet")  # doctest: +SKIP
        >>> load_alignment_dataset("coco_precomp", splits=["test"], test_split="testall")  # doctest: +SKIP
        >>> load_alignment_dataset("openclipart", image_size=224, max_per_caption=5)  # doctest: +SKIP
        >>> load_alignment_dataset("node_modules/openmoji", kind="openmoji", fold=0)  # doctest: +SKIP
    """
    if kind is None and os.fspath(source) in (OPENCLIPART, OPENMOJI):
        kind = os.fspath(source)
    kind = detect_kind(source) if kind is None else kind
    if kind == OPENCLIPART:
        return _load_openclipart(source, dict(kwargs))
    if kind == OPENMOJI:
        return _load_openmoji(source, dict(kwargs))
    if kind == "karpathy":
        return load_karpathy(source, **kwargs)
    if kind == "imagefolder":
        return load_imagefolder(source, **kwargs)
    if kind == "precomp":
        return load_precomp(source, **kwargs)
    if kind == "regions":
        return load_region_dataset(source, **kwargs)
    if kind == "hub":
        return _load_hub_or_regions(source, dict(kwargs))
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS} or None to detect it")

"""Karpathy split files (`dataset_flickr30k.json`, `dataset_coco.json`) plus an image root.

Each file holds `{"dataset": ..., "images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}],
"imgid", "cocoid"?, ...}]}`. Images live at `root/filepath/filename` (COCO: `filepath` is `train2014` or
`val2014`) or `root/filename` (Flickr30K has no `filepath`). Split sizes of the standard files:

| file | train | validation | test |
|---|---|---|---|
| `dataset_flickr30k.json` | 29,000 | 1,014 | 1,000 |
| `dataset_coco.json` | 113,287 (82,783 `train` + 30,504 `restval`) | 5,000 | 5,000 |

`image_id` is the COCO id (`cocoid`) where the file has one, else Karpathy's `imgid`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from .checks import build_image_split, resolve_splits
from .schema import validate_dataset_dict

logger = logging.getLogger(__name__)

KARPATHY_SPLITS: dict[str, str] = {"train": "train", "val": "validation", "test": "test", "restval": "train"}
"""Karpathy split value -> schema split (`restval` joins train unless `include_restval=False`)."""

STANDARD_SPLIT_SIZES: dict[str, dict[str, int]] = {
    "flickr30k": {"train": 29_000, "validation": 1_014, "test": 1_000},
    "coco": {"train": 113_287, "validation": 5_000, "test": 5_000},
}
"""Images per split in the standard Karpathy files (COCO train includes `restval`)."""

COCO_RESTVAL_SIZE = 30_504


def karpathy_split(value: Any, include_restval: bool = True) -> str | None:
    """Schema split of a Karpathy `split` value; None for `restval` when it is excluded.

    Raises `ValueError` for a value that is not train/val/test/restval.
    """
    if value not in KARPATHY_SPLITS:
        raise ValueError(f"split value {value!r} is not one of {sorted(KARPATHY_SPLITS)}")
    if value == "restval" and not include_restval:
        return None
    return KARPATHY_SPLITS[value]


def expected_split_sizes(dataset_name: str, include_restval: bool = True) -> dict[str, int] | None:
    """Standard split sizes of a Karpathy file (`"flickr30k"`, `"coco"`); None for other names."""
    sizes = STANDARD_SPLIT_SIZES.get(dataset_name)
    if sizes is None:
        return None
    sizes = dict(sizes)
    if dataset_name == "coco" and not include_restval:
        sizes["train"] -= COCO_RESTVAL_SIZE
    return sizes


def _read_entries(path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """The `dataset` name and the `images` list of a Karpathy file, with clear errors."""
    if not path.is_file():
        raise FileNotFoundError(f"Karpathy split file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} has no 'images' list; expected Karpathy's {{'images': [...]}} format")
    return data.get("dataset"), data["images"]


def _parse_entry(entry: Any, index: int, image_root: Path, where: str) -> tuple[str, str, list[str], Any]:
    """`(image_id, image_path, captions, split value)` of one `images` entry."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: images[{index}] is {type(entry).__name__}; expected an object")
    for key in ("filename", "split", "sentences"):
        if key not in entry:
            raise ValueError(f"{where}: images[{index}] has no {key!r} key; it has {sorted(entry)}")
    image_id = entry.get("cocoid", entry.get("imgid"))
    if image_id is None:
        raise ValueError(f"{where}: images[{index}] ({entry['filename']!r}) has neither 'cocoid' nor 'imgid'")
    sentences = entry["sentences"]
    if not isinstance(sentences, list):
        raise ValueError(f"{where}: images[{index}] 'sentences' is not a list")
    captions = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
    path = image_root / (entry.get("filepath") or "") / entry["filename"]
    return str(image_id), os.fspath(path), captions, entry["split"]


def load_karpathy(
    annotations: str | os.PathLike,
    image_root: str | os.PathLike,
    splits: Sequence[str] | None = None,
    include_restval: bool = True,
    skip_missing: bool = False,
) -> DatasetDict:
    """Load a Karpathy split file into the schema (`image` column from paths, decoded lazily).

    Args:
        annotations: `dataset_flickr30k.json` / `dataset_coco.json` (or any file in that format).
        image_root: folder holding the images (`root/filepath/filename` or `root/filename`).
        splits: schema splits to keep (aliases `val`/`dev` accepted); all by default.
        include_restval: fold COCO's `restval` images into train (the standard 113,287-image train set).
        skip_missing: drop rows whose image file is missing (logging how many) instead of raising.

    Raises `FileNotFoundError` for a missing file/folder or missing images (the first few named),
    `ValueError` for a malformed entry, an unknown split value or a blank caption.
    """
    path, root = Path(annotations), Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {str(root)!r} is not a directory")
    dataset_name, entries = _read_entries(path)
    rows: dict[str, tuple[list[str], list[str], list[list[str]]]] = {}
    for index, entry in enumerate(entries):
        image_id, image_path, captions, value = _parse_entry(entry, index, root, path.name)
        try:
            split = karpathy_split(value, include_restval)
        except ValueError as error:
            raise ValueError(f"{path.name}: images[{index}] ({image_path!r}): {error}") from None
        if split is not None:
            ids, paths, caps = rows.setdefault(split, ([], [], []))
            ids.append(image_id)
            paths.append(image_path)
            caps.append(captions)
    chosen = resolve_splits(rows, splits, path.name)
    result = DatasetDict(
        {split: build_image_split(*rows[split], f"{path.name} [{split}]", skip_missing) for split in chosen}
    )
    _warn_on_nonstandard_sizes(result, dataset_name, include_restval, path.name)
    return validate_dataset_dict(result)


def _warn_on_nonstandard_sizes(
    dataset: DatasetDict, dataset_name: str | None, include_restval: bool, where: str
) -> None:
    """Log a warning when a standard file (by its `dataset` name) yields non-standard split sizes."""
    expected = expected_split_sizes(dataset_name or "", include_restval)
    if expected is None:
        return
    for split, table in dataset.items():
        if len(table) != expected[split]:
            logger.warning(
                "%s [%s]: %d images, the standard Karpathy %s split has %d",
                where,
                split,
                len(table),
                dataset_name,
                expected[split],
            )

"""Hub datasets (by id or a local directory laid out like a Hub repo) in known schemas.

- `nlphuji/flickr30k`: `image` (Image), `caption` (5 strings), `sentids`, `split` (train/val/test),
  `img_id`, `filename`; one Hub split (`test`) holds every row, the Karpathy split is the `split` column.
  The Hub repo is script-based; `datasets>=4` reads its Parquet export with
  `revision="refs/convert/parquet"`.
- `yerevann/coco-karpathy`: `filepath`, `filename`, `sentences` (strings), `split`
  (train/val/test/restval), `cocoid`, `url`, ...; Hub splits train/validation/test. No images: pass
  `image_root` holding `root/filepath/filename` (the COCO 2014 folders).
- Our own schema (`image_id`, `image`, `captions`), e.g. a dataset pushed from this package.

Rows are partitioned by the `split` column where there is one, so either Hub split layout works.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import (
    Dataset,
    DatasetDict,
    LargeList,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)

from .checks import build_image_split, check_caption_column, resolve_splits
from .karpathy import karpathy_split
from .schema import canonical_split, image_features, validate_dataset_dict

SCHEMA_COLUMNS: dict[str, tuple[str, ...]] = {
    "flickr30k": ("image", "caption", "split", "img_id"),
    "coco-karpathy": ("filepath", "filename", "sentences", "split", "cocoid"),
    "images": ("image_id", "image", "captions"),
    "regions": ("image_id", "region_features", "captions"),
}
"""Columns that identify each known schema (`regions` is handled by `precomputed.py`)."""


def load_raw_dataset(source: str | os.PathLike, **load_kwargs: Any) -> DatasetDict:
    """Load a Hub id, a local Hub-layout directory or a `save_to_disk` directory as a `DatasetDict`.

    `load_kwargs` go to `datasets.load_dataset` (`revision`, `cache_dir`, `token`, ...). Raises
    `FileNotFoundError` for a local-looking path that does not exist.
    """
    path = Path(source)
    text = os.fspath(source)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = load_from_disk(text)
    else:
        looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
        if looks_local and not path.exists():
            raise FileNotFoundError(f"dataset directory {text!r} does not exist")
        loaded = load_dataset(text, **load_kwargs)
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({str(load_kwargs.get("split", "train")): loaded})
    if not isinstance(loaded, DatasetDict):
        raise ValueError(
            f"{text}: expected a map-style DatasetDict, got {type(loaded).__name__} (no streaming)"
        )
    return loaded


def detect_hub_schema(column_names: Sequence[str]) -> str:
    """Name of the known schema (`SCHEMA_COLUMNS` key) whose columns `column_names` contains."""
    for name, required in SCHEMA_COLUMNS.items():
        if set(required) <= set(column_names):
            return name
    known = "; ".join(f"{name}: {list(cols)}" for name, cols in SCHEMA_COLUMNS.items())
    raise ValueError(f"columns {sorted(column_names)} match no known schema ({known})")


def _combined(raw: DatasetDict, where: str) -> Dataset:
    """All Hub splits of `raw` as one dataset (they are re-partitioned by the `split` column)."""
    if len(raw) == 0:
        raise ValueError(f"{where} has no splits")
    parts = list(raw.values())
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _partition(values: Sequence[Any], include_restval: bool, where: str) -> dict[str, list[int]]:
    """Row indices per schema split from a Karpathy `split` column."""
    rows: dict[str, list[int]] = {}
    for row, value in enumerate(values):
        try:
            split = karpathy_split(value, include_restval)
        except ValueError as error:
            raise ValueError(f"{where}: row {row}: {error}") from None
        if split is not None:
            rows.setdefault(split, []).append(row)
    return rows


def _convert_flickr30k(
    raw: DatasetDict, splits: Sequence[str] | None, include_restval: bool, where: str
) -> DatasetDict:
    """nlphuji/flickr30k schema -> ours, keeping the embedded image bytes (no rewrite of the table)."""
    table = _combined(raw, where)
    if not isinstance(table.features["caption"], (List, LargeList, list)):
        raise ValueError(
            f"{where}: column 'caption' is {table.features['caption']}; expected a list of strings"
        )
    rows = _partition(table["split"], include_restval, where)
    image_ids = [str(value) for value in table["img_id"]]
    table = table.select_columns(["image", "caption"]).rename_column("caption", "captions")
    table = table.add_column("image_id", image_ids, feature=Value("string"))
    if table.features["captions"] != List(Value("string")):  # a cast rewrites the table, images included
        table = table.cast_column("captions", List(Value("string")))
    table = table.select_columns(["image_id", "image", "captions"])
    result = DatasetDict()
    for split in resolve_splits(rows, splits, where):
        result[split] = table.select(rows[split])
        check_caption_column(result[split], f"{where} [{split}]")
    return result


def _convert_coco_karpathy(
    raw: DatasetDict,
    image_root: str | os.PathLike | None,
    splits: Sequence[str] | None,
    include_restval: bool,
    skip_missing: bool,
    where: str,
) -> DatasetDict:
    """yerevann/coco-karpathy schema + an image root -> ours (image paths, decoded lazily)."""
    if image_root is None:
        raise ValueError(f"{where} ships no images; pass image_root=<folder holding filepath/filename>")
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {str(root)!r} is not a directory")
    columns = _combined(raw, where).select_columns(["filepath", "filename", "sentences", "split", "cocoid"])
    data = columns.to_dict()
    rows = _partition(data["split"], include_restval, where)
    result = DatasetDict()
    for split in resolve_splits(rows, splits, where):
        picked = rows[split]
        ids = [str(data["cocoid"][i]) for i in picked]
        paths = [os.fspath(root / (data["filepath"][i] or "") / data["filename"][i]) for i in picked]
        captions = [
            [s.get("raw") if isinstance(s, dict) else s for s in data["sentences"][i]] for i in picked
        ]
        result[split] = build_image_split(ids, paths, captions, f"{where} [{split}]", skip_missing)
    return result


def _convert_own_schema(raw: DatasetDict, splits: Sequence[str] | None, where: str) -> DatasetDict:
    """A dataset already in our image schema: canonical split names, checked captions."""
    named = {canonical_split(name): table for name, table in raw.items()}
    result = DatasetDict()
    for split in resolve_splits(named, splits, where):
        table = named[split].select_columns(["image_id", "image", "captions"])
        check_caption_column(table, f"{where} [{split}]")
        target = image_features()
        target["image"] = table.features["image"]  # keep its decode/mode settings
        result[split] = table if table.features == target else table.cast(target)
    return result


def convert_hub_dataset(
    raw: DatasetDict,
    image_root: str | os.PathLike | None = None,
    splits: Sequence[str] | None = None,
    include_restval: bool = True,
    skip_missing: bool = False,
    source: str = "dataset",
) -> DatasetDict:
    """Convert a loaded dataset in a known image-caption schema (see module doc) into ours.

    `image_root` is needed for coco-karpathy; `include_restval` folds `restval` into train;
    `skip_missing` drops rows whose image file is missing; `source` names the data in errors.
    """
    if len(raw) == 0:
        raise ValueError(f"{source} has no splits")
    schema = detect_hub_schema(next(iter(raw.values())).column_names)
    if schema == "flickr30k":
        result = _convert_flickr30k(raw, splits, include_restval, source)
    elif schema == "coco-karpathy":
        result = _convert_coco_karpathy(raw, image_root, splits, include_restval, skip_missing, source)
    elif schema == "images":
        result = _convert_own_schema(raw, splits, source)
    else:
        raise ValueError(f"{source} holds region features; load it with load_region_dataset")
    return validate_dataset_dict(result)


def load_hub_dataset(
    source: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    splits: Sequence[str] | None = None,
    include_restval: bool = True,
    skip_missing: bool = False,
    **load_kwargs: Any,
) -> DatasetDict:
    """Load a Hub id or local directory (`load_raw_dataset`) and convert it (`convert_hub_dataset`).

    Example: `load_hub_dataset("nlphuji/flickr30k", revision="refs/convert/parquet")`.
    """
    raw = load_raw_dataset(source, **load_kwargs)
    return convert_hub_dataset(
        raw, image_root, splits, include_restval, skip_missing, source=os.fspath(source)
    )

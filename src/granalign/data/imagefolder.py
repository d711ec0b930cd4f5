"""An image folder with `metadata.jsonl` / `metadata.csv` / `metadata.parquet` (the HF `imagefolder` layout).

Reading is delegated to `load_dataset("imagefolder", data_dir=...)`, which already finds the metadata,
turns `file_name` into an `Image` column, guards against paths escaping the folder, and names splits from
sub-folders (`train/`; `validation/`, `valid/`, `val/`, `dev/`; `test/`). On top of it this module
picks the caption column (`captions` list, `caption`/`text` string, or an explicit name), groups several
rows of one file into one row with all its captions (source order), derives `image_id` (an `image_id`
column, else the file path relative to the folder), and checks that files exist and captions are not
blank (the builder itself never opens the images).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Image, load_dataset

from .checks import build_image_split, resolve_splits
from .schema import SPLITS, canonical_split, validate_dataset_dict

CAPTION_COLUMNS: tuple[str, ...] = ("captions", "caption", "text", "sentences")
"""Caption columns tried in order when `caption_column` is not given."""

METADATA_FILES: tuple[str, ...] = ("metadata.jsonl", "metadata.csv", "metadata.parquet")

_TRAIN_DIRS = ("train", "training")


def _find_caption_column(columns: Sequence[str], caption_column: str | None, where: str) -> str:
    """The caption column to use, with a clear error when there is none."""
    if caption_column is not None:
        if caption_column not in columns:
            raise ValueError(f"{where}: metadata has no column {caption_column!r}; it has {list(columns)}")
        return caption_column
    for name in CAPTION_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"{where}: metadata has none of the caption columns {list(CAPTION_COLUMNS)}; it has {list(columns)}; "
        "pass caption_column=..."
    )


def _group_by_file(
    split: Dataset, caption_column: str, folder: Path, where: str
) -> tuple[list[str], list[str], list[list[Any]]]:
    """`(image_ids, paths, captions)` with one entry per file, rows of one file merged in order."""
    columns = ["image", caption_column] + (["image_id"] if "image_id" in split.column_names else [])
    data = split.select_columns(columns).cast_column("image", Image(decode=False)).to_dict()
    ids: dict[str, str] = {}
    captions: dict[str, list[Any]] = {}
    for row, (image, value) in enumerate(zip(data["image"], data[caption_column], strict=True)):
        path = image["path"]
        image_id = (
            data["image_id"][row] if "image_id" in data else Path(os.path.relpath(path, folder)).as_posix()
        )
        image_id = str(image_id) if image_id is not None else None
        if ids.setdefault(path, image_id) != image_id:
            raise ValueError(
                f"{where}: metadata row {row} gives {path!r} image_id {image_id!r}, "
                f"an earlier row {ids[path]!r}"
            )
        captions.setdefault(path, []).extend(value if isinstance(value, list) else [value])
    paths = list(captions)
    return [ids[p] for p in paths], paths, [captions[p] for p in paths]


def load_imagefolder(
    data_dir: str | os.PathLike,
    caption_column: str | None = None,
    single_split: str = "train",
    splits: Sequence[str] | None = None,
    skip_missing: bool = False,
    **load_kwargs: Any,
) -> DatasetDict:
    """Load an image folder with captions in its metadata file(s) into the schema.

    Args:
        data_dir: the folder (split sub-folders, or images + metadata directly in it).
        caption_column: metadata column holding a caption string or a list of captions; default: the
            first of `CAPTION_COLUMNS` present.
        single_split: split name for a folder without split sub-folders (e.g. `"test"`).
        splits: schema splits to keep; all by default.
        skip_missing: drop files listed in the metadata but missing on disk (logging how many).
        load_kwargs: passed to `datasets.load_dataset` (e.g. `cache_dir`).
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    if not any(next(folder.rglob(name), None) for name in METADATA_FILES):
        raise FileNotFoundError(
            f"{folder} has no {' / '.join(METADATA_FILES)} with the captions (file_name + caption)"
        )
    single = canonical_split(single_split)
    if single not in SPLITS:
        raise ValueError(f"single_split must be one of {SPLITS} (or an alias), got {single_split!r}")
    raw = load_dataset("imagefolder", data_dir=os.fspath(folder), **load_kwargs)
    flat = set(raw) == {"train"} and not any((folder / name).is_dir() for name in _TRAIN_DIRS)
    named = {single if flat else canonical_split(name): table for name, table in raw.items()}
    result = DatasetDict()
    for split in resolve_splits(named, splits, f"image folder {folder}"):
        where = f"{folder} [{split}]"
        column = _find_caption_column(named[split].column_names, caption_column, where)
        ids, paths, captions = _group_by_file(named[split], column, folder, where)
        result[split] = build_image_split(ids, paths, captions, where, skip_missing)
    return validate_dataset_dict(result)

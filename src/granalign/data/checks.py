"""Validation shared by the loaders: split names, captions, image files, image readability, region arrays.

Cheap checks (captions, ids, file existence) run at load time; decoding every image is left to
`check_images`, which training calls when asked to skip and count bad rows.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Image
from PIL import Image as PILImage

from .schema import SPLITS, canonical_split, image_features

logger = logging.getLogger(__name__)

_SHOW = 5  # how many offending rows or files an error message names


def resolve_splits(available: Iterable[str], requested: Iterable[str] | None, where: str) -> list[str]:
    """Canonical names of the `requested` splits (all `available` ones when None), in schema order.

    Raises `ValueError` naming a requested split the source lacks and listing the ones it has.
    """
    available = [canonical_split(name) for name in available]
    if requested is None:
        return [name for name in SPLITS if name in available]
    if isinstance(requested, str):
        requested = [requested]
    chosen = []
    for name in requested:
        split = canonical_split(name)
        if split not in available:
            raise ValueError(f"{where} has no split {name!r}; available splits: {sorted(set(available))}")
        if split not in chosen:
            chosen.append(split)
    return chosen


def check_rows(image_ids: Sequence[Any], captions: Sequence[Any], where: str) -> None:
    """Check every row has a non-empty id, unique ids, and a non-empty list of non-blank captions.

    Raises `ValueError` naming the row index and image id of the first bad row.
    """
    if len(image_ids) != len(captions):
        raise ValueError(f"{where}: {len(image_ids)} image ids but {len(captions)} caption lists")
    seen: dict[str, int] = {}
    for row, (image_id, caps) in enumerate(zip(image_ids, captions, strict=True)):
        if not isinstance(image_id, str) or not image_id:
            raise ValueError(f"{where}: row {row} has image_id {image_id!r}; expected a non-empty string")
        if image_id in seen:
            raise ValueError(f"{where}: image_id {image_id!r} appears in rows {seen[image_id]} and {row}")
        seen[image_id] = row
        if not isinstance(caps, (list, tuple)) or len(caps) == 0:
            raise ValueError(f"{where}: row {row} (image_id {image_id!r}) has no captions")
        for k, caption in enumerate(caps):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(
                    f"{where}: caption {k} of row {row} (image_id {image_id!r}) is {caption!r}; "
                    "expected a non-blank string"
                )


def check_caption_column(dataset: Dataset, where: str) -> None:
    """`check_rows` on the `image_id` (as strings) and `captions` columns of an Arrow-backed split.

    Only these two columns are read; images and region arrays are not touched.
    """
    columns = dataset.select_columns(["image_id", "captions"]).to_dict()
    image_ids = [None if value is None else str(value) for value in columns["image_id"]]
    check_rows(image_ids, columns["captions"], where)


def drop_missing_files(paths: Sequence[str], skip_missing: bool, where: str) -> list[int]:
    """Indices of `paths` that exist. Missing files raise `FileNotFoundError` naming the first few,
    unless `skip_missing`, which drops them and logs how many."""
    missing = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
    if missing and not skip_missing:
        named = ", ".join(repr(paths[i]) for i in missing[:_SHOW])
        raise FileNotFoundError(
            f"{where}: {len(missing)} of {len(paths)} image files do not exist, e.g. {named}; "
            "check the image root, or pass skip_missing=True to drop these rows"
        )
    if missing:
        logger.warning(
            "%s: skipped %d of %d rows whose image file is missing", where, len(missing), len(paths)
        )
    gone = set(missing)
    return [i for i in range(len(paths)) if i not in gone]


def build_image_split(
    image_ids: Sequence[str],
    image_paths: Sequence[str],
    captions: Sequence[Sequence[str]],
    where: str,
    skip_missing: bool = False,
) -> Dataset:
    """A schema split from per-image lists, after checking files exist and captions are non-blank.

    The `image` column stores paths; `datasets.Image()` decodes them lazily on access.
    """
    keep = drop_missing_files(image_paths, skip_missing, where)
    if len(keep) < len(image_paths):
        image_ids = [image_ids[i] for i in keep]
        image_paths = [image_paths[i] for i in keep]
        captions = [captions[i] for i in keep]
    check_rows(image_ids, captions, where)
    columns = {
        "image_id": list(image_ids),
        "image": list(image_paths),
        "captions": [list(c) for c in captions],
    }
    return Dataset.from_dict(columns, features=image_features())


def image_problem(image: dict[str, Any] | None) -> str | None:
    """Why an undecoded `Image()` value (`{"bytes", "path"}`) cannot be decoded; None when it can."""
    if image is None:
        return "the row has no image"
    data, path = image.get("bytes"), image.get("path")
    if data is None and not path:
        return "the row has neither image bytes nor a path"
    try:
        with PILImage.open(io.BytesIO(data) if data is not None else path) as im:
            im.verify()  # structure and checksums; the object is unusable afterwards
        with PILImage.open(io.BytesIO(data) if data is not None else path) as im:
            im.load()  # full decode: catches truncated pixel data that verify() misses
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        return f"{type(error).__name__}: {error}"
    return None


def check_images(
    dataset: Dataset,
    skip_bad: bool = False,
    image_column: str = "image",
    num_threads: int | None = None,
    batch_size: int = 256,
) -> tuple[Dataset, int]:
    """Decode every image of a split; return `(dataset, num_bad)`.

    With `skip_bad=False` the first unreadable image raises `ValueError` naming its row, image id and
    file; with `skip_bad=True` such rows are filtered out and counted. Decoding runs on `num_threads`
    threads (default: the CPU count); results do not depend on it.
    """
    if image_column not in dataset.column_names:
        raise ValueError(
            f"check_images needs a column {image_column!r}; the split has {dataset.column_names}"
        )
    columns = [image_column] + (["image_id"] if "image_id" in dataset.column_names else [])
    raw = dataset.select_columns(columns).cast_column(image_column, Image(decode=False))
    bad: list[int] = []
    with ThreadPoolExecutor(max_workers=num_threads or os.cpu_count() or 1) as pool:
        for start in range(0, len(raw), batch_size):
            batch = raw[start : start + batch_size]
            for offset, problem in enumerate(pool.map(image_problem, batch[image_column])):
                if problem is None:
                    continue
                row = start + offset
                if not skip_bad:
                    image_id = batch["image_id"][offset] if "image_id" in batch else None
                    path = batch[image_column][offset].get("path")
                    raise ValueError(
                        f"row {row} (image_id {image_id!r}, file {path!r}) is not a readable image: {problem}"
                    )
                bad.append(row)
    if not bad:
        return dataset, 0
    logger.warning(
        "skipped %d of %d rows whose image cannot be decoded (rows %s...)", len(bad), len(raw), bad[:_SHOW]
    )
    gone = set(bad)
    return dataset.select([i for i in range(len(dataset)) if i not in gone]), len(bad)


def _is_list(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_list(data_type)
        or pa.types.is_large_list(data_type)
        or pa.types.is_fixed_size_list(data_type)
    )


def _storage(values: pa.ChunkedArray) -> pa.Array:
    """One contiguous array of the column's storage (extension types such as `Array2D` unwrapped)."""
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return array.storage if isinstance(array, pa.ExtensionArray) else array


def _check_array_type(data_type: pa.DataType, column: str, where: str) -> None:
    """The column must hold lists of lists of numbers (`[N, D]` per row)."""
    if isinstance(data_type, pa.ExtensionType):
        data_type = data_type.storage_type
    inner = data_type.value_type if _is_list(data_type) else None
    ok = inner is not None and (
        pa.types.is_null(inner)
        or (
            _is_list(inner)
            and (pa.types.is_floating(inner.value_type) or pa.types.is_integer(inner.value_type))
        )
    )
    if not ok:
        raise ValueError(
            f"{where}: column {column!r} has type {data_type}; expected an [N, D] array of numbers per row"
        )


def check_region_column(
    dataset: Dataset, column: str, dim: int | None, where: str, batch_size: int = 256
) -> tuple[int, list[int]]:
    """Check a `[N, D]`-per-row array column: no null rows, N >= 1, every vector of length `dim`.

    `dim=None` takes D from the first vector. Returns `(D, N per row)`; raises `ValueError` naming the
    first bad row and its image id.
    """
    counts: list[int] = []
    table = dataset.select_columns([column, "image_id"]).with_format("arrow")
    for start, batch in zip(
        range(0, len(dataset), batch_size), table.iter(batch_size=batch_size), strict=True
    ):
        _check_array_type(batch.schema.field(column).type, column, where)
        values, ids = _storage(batch.column(column)), [str(i) for i in batch.column("image_id").to_pylist()]
        n_per_row = pc.list_value_length(values).to_pylist()
        bad = next((row for row, n in enumerate(n_per_row) if not n), None)
        if bad is not None:
            problem = "no" if n_per_row[bad] is None else "an empty"
            raise ValueError(
                f"{where}: row {start + bad} (image_id {ids[bad]!r}) has {problem} {column!r} array"
            )
        lengths = pc.list_value_length(pc.list_flatten(values)).fill_null(-1)
        if dim is None:
            dim = lengths[0].as_py()
        wrong = pc.not_equal(lengths, pa.scalar(dim, lengths.type))
        if pc.any(wrong).as_py():
            index = pc.index(wrong, True).as_py()
            row = pc.list_parent_indices(values)[index].as_py()
            raise ValueError(
                f"{where}: row {start + row} (image_id {ids[row]!r}) has {column!r} vectors of length "
                f"{lengths[index].as_py()}; expected {dim}"
            )
        counts.extend(n_per_row)
    return int(dim or 0), counts

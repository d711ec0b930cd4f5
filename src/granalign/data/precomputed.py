"""Precomputed region features: the SCAN/VSE∞ "precomp" folder, or a dataset with an `[N, D]` column.

Precomp folder (`f30k_precomp/`, `coco_precomp/`): per split `{split}_ims.npy` (`[N_img, R, D]`, e.g.
36 × 2048; `[N_img, D]` is read as R = 1; some releases repeat each image once per caption, giving
`N_img * captions_per_image` rows, which is detected and read with that stride), `{split}_caps.txt`
(`captions_per_image` consecutive lines per image: 5 for Flickr30K/COCO, the default) and optionally
`{split}_ids.txt` (one id per image, or per caption). Splits `train`, `dev` (-> validation), `test`,
`testall` (COCO 5K; used as `test` with `test_split="testall"`).

The arrays are memory-mapped and streamed with `Dataset.from_generator` into a float32 Arrow copy, so
a split never sits in memory at once. That copy is written once per split (and reused while the files
and options are unchanged) under `cache_dir`, by default the datasets cache: `$HF_DATASETS_CACHE`, i.e.
`~/.cache/huggingface/datasets` unless `HF_HOME`/`HF_DATASETS_CACHE` say otherwise. It costs disk
(float32, so as large as a float32 `.npy` and twice a float16 one: ~33 GB for COCO's 113K-image train
split) and one pass of writing, and buys the `datasets` schema every other loader gives (Arrow,
memory-mapped when read, so RAM stays small). Reading the `.npy` directly would avoid the copy but not
give a `Dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from .checks import check_caption_column, check_region_column, check_rows, resolve_splits
from .hub_schemas import load_raw_dataset
from .schema import canonical_split, region_features, validate_dataset_dict

PRECOMP_FILES: dict[str, str] = {"train": "train", "dev": "validation", "test": "test", "testall": "test"}
"""Precomp file prefix -> schema split."""


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without their line endings."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _open_array(path: Path, feature_dim: int | None) -> np.ndarray:
    """Memory-map `{split}_ims.npy` as `[rows, R, D]` floats (no pickles)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npy array of numbers: {error}") from None
    if not np.issubdtype(array.dtype, np.floating) or array.ndim not in (2, 3):
        raise ValueError(
            f"{path} holds {array.dtype} of shape {array.shape}; expected floats [N, R, D] or [N, D]"
        )
    if array.ndim == 2:
        array = array[:, None, :]
    if feature_dim is not None and array.shape[2] != feature_dim:
        raise ValueError(
            f"{path} has feature dim {array.shape[2]} (shape {array.shape}); expected {feature_dim}"
        )
    return array


def _per_image_hint(rows: int, num_captions: int) -> str:
    """A suggested `captions_per_image` when the counts imply one."""
    if rows and num_captions % rows == 0 and num_captions // rows >= 1:
        return f"; pass captions_per_image={num_captions // rows} if each image has that many captions"
    return "; pass captions_per_image=<caption lines per image>"


def _image_stride(array: np.ndarray, num_captions: int, per_image: int, path: Path) -> int:
    """1 when `array` has one row per image, `per_image` when it repeats each image per caption."""
    rows = len(array)
    if rows * per_image == num_captions:
        return 1
    if rows == num_captions and num_captions % per_image == 0:
        if not np.array_equal(array[0], array[per_image - 1]):
            raise ValueError(
                f"{path} has {rows} rows and the captions file has {num_captions} lines: with "
                f"captions_per_image={per_image} that means one row per caption, each image repeated "
                f"{per_image} times, but rows 0 and {per_image - 1} differ; if each image has one "
                "caption, pass captions_per_image=1"
            )
        return per_image
    raise ValueError(
        f"{path} has {rows} rows but the captions file has {num_captions} lines, which fits neither "
        f"{rows} images × captions_per_image={per_image} ({rows * per_image} lines) nor one row per "
        f"caption" + _per_image_hint(rows, num_captions)
    )


def _image_ids(path: Path, num_images: int, per_image: int, prefix: str) -> list[str]:
    """Ids from `{split}_ids.txt` (one per image or per caption), else `{prefix}-{index}`."""
    if not path.is_file():
        return [f"{prefix}-{i}" for i in range(num_images)]
    ids = [line.strip() for line in _read_lines(path)]
    if len(ids) == num_images * per_image and per_image > 1:
        ids = ids[::per_image]
    if len(ids) != num_images:
        raise ValueError(f"{path} has {len(ids)} lines; expected {num_images} (one per image)")
    return ids


def _generate_rows(
    ims_path: str, stride: int, image_ids: Sequence[str], captions: Sequence[Sequence[str]]
) -> Iterator[dict[str, Any]]:
    """Rows of one precomp split, read one image at a time from the memory map."""
    array = np.load(ims_path, mmap_mode="r", allow_pickle=False)
    if array.ndim == 2:
        array = array[:, None, :]
    for index, (image_id, caps) in enumerate(zip(image_ids, captions, strict=True)):
        features = np.asarray(array[index * stride], dtype=np.float32)
        yield {"image_id": image_id, "region_features": features, "captions": list(caps)}


def _fingerprint(*parts: Any) -> str:
    """Cache key of a generated split: changes with the files' size and mtime and the options."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _precomp_split(
    folder: Path, prefix: str, per_image: int, feature_dim: int | None, cache_dir: str | None
) -> Dataset:
    """One precomp split as a streamed Arrow dataset."""
    ims_path, caps_path = folder / f"{prefix}_ims.npy", folder / f"{prefix}_caps.txt"
    for required in (ims_path, caps_path):
        if not required.is_file():
            raise FileNotFoundError(f"precomp split {prefix!r} lacks {str(required)!r}")
    array = _open_array(ims_path, feature_dim)
    lines = _read_lines(caps_path)
    stride = _image_stride(array, len(lines), per_image, ims_path)
    num_images = len(array) // stride
    image_ids = _image_ids(folder / f"{prefix}_ids.txt", num_images, per_image, prefix)
    captions = [lines[i * per_image : (i + 1) * per_image] for i in range(num_images)]
    check_rows(image_ids, captions, f"{caps_path}")
    stats = [(os.fspath(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (ims_path, caps_path)]
    # tuples, not lists: `datasets` would read lists in gen_kwargs as shards
    kwargs = {"ims_path": os.fspath(ims_path), "stride": stride, "image_ids": tuple(image_ids)}
    kwargs["captions"] = tuple(tuple(c) for c in captions)
    return Dataset.from_generator(
        _generate_rows,
        features=region_features(int(array.shape[2])),
        gen_kwargs=kwargs,
        cache_dir=cache_dir,
        fingerprint=_fingerprint("precomp-v1", stats, stride, image_ids, per_image),
    )


def load_precomp(
    data_dir: str | os.PathLike,
    splits: Sequence[str] | None = None,
    test_split: str | None = None,
    captions_per_image: int = 5,
    feature_dim: int | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load a SCAN/VSE∞ precomp folder into the region schema.

    Args:
        data_dir: folder with `{split}_ims.npy` / `{split}_caps.txt` (/ `{split}_ids.txt`).
        splits: schema splits to load (`dev`/`val` accepted); all present by default. Loading COCO's
            113K-image train split writes ~33 GB of Arrow, so pick splits when you need few.
        test_split: file prefix used for `test`: `"test"` (F30K 1K; COCO 1K) or `"testall"` (COCO 5K).
            Default: `test` when present, else `testall`.
        captions_per_image: caption lines per image in `{split}_caps.txt` (5 for Flickr30K and COCO;
            1 for one caption per image). A file whose line count does not fit raises `ValueError`
            naming this option and the counts found.
        feature_dim: expected D; a different D raises `ValueError`.
        cache_dir: folder for the float32 Arrow copy of the features (see the module docstring). Default
            None: the datasets cache, `$HF_DATASETS_CACHE` (`~/.cache/huggingface/datasets`).
    """
    folder = Path(data_dir)
    if not isinstance(captions_per_image, int) or captions_per_image < 1:
        raise ValueError(f"captions_per_image must be an integer >= 1, got {captions_per_image!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"precomp directory {str(folder)!r} does not exist")
    present = sorted(p for p in PRECOMP_FILES if (folder / f"{p}_ims.npy").is_file())
    if not present:
        raise FileNotFoundError(f"{folder} has no {{split}}_ims.npy file (splits {sorted(PRECOMP_FILES)})")
    if test_split is None:
        test_split = "test" if "test" in present else "testall"
    if test_split not in ("test", "testall"):
        raise ValueError(f"test_split must be 'test' or 'testall', got {test_split!r}")
    prefixes = {PRECOMP_FILES[p]: p for p in present if PRECOMP_FILES[p] != "test" or p == test_split}
    result = DatasetDict()
    for split in resolve_splits(prefixes, splits, f"precomp directory {folder}"):
        result[split] = _precomp_split(folder, prefixes[split], captions_per_image, feature_dim, cache_dir)
    return validate_dataset_dict(result)


def convert_region_dataset(
    raw: DatasetDict | Dataset,
    features_column: str = "region_features",
    boxes_column: str | None = None,
    image_id_column: str = "image_id",
    captions_column: str = "captions",
    feature_dim: int | None = None,
    splits: Sequence[str] | None = None,
    source: str = "dataset",
) -> DatasetDict:
    """Validate a dataset with a per-image `[N, D]` array column (N may vary) and cast it to our schema.

    Columns are renamed to `image_id`, `region_features`, `captions` (+ `region_boxes` `[N, 4]` when
    `boxes_column` is given); the arrays become float32 `Array2D(None, D)`. Raises `ValueError` naming
    the row and image id of a vector of the wrong length, an empty array, a box count differing from the
    region count, or a blank caption.
    """
    if isinstance(raw, Dataset):
        raw = DatasetDict({"train": raw})
    named = {canonical_split(name): table for name, table in raw.items()}
    renames = {image_id_column: "image_id", features_column: "region_features", captions_column: "captions"}
    if boxes_column is not None:
        renames[boxes_column] = "region_boxes"
    result = DatasetDict()
    for split in resolve_splits(named, splits, source):
        where = f"{source} [{split}]"
        table = named[split]
        missing = [column for column in renames if column not in table.column_names]
        if missing:
            raise ValueError(f"{where} lacks column(s) {missing}; it has {table.column_names}")
        table = table.select_columns(list(renames)).rename_columns(renames)
        feature_dim, counts = check_region_column(table, "region_features", feature_dim, where)
        if boxes_column is not None:
            _, box_counts = check_region_column(table, "region_boxes", 4, where)
            _check_box_counts(table, counts, box_counts, where)
        check_caption_column(table, where)
        target = region_features(feature_dim, with_boxes=boxes_column is not None)
        if table.features != target:  # one cast (it rewrites the table), after the checks it cannot do
            table = table.cast(target)
        result[split] = table
    return validate_dataset_dict(result)


def _check_box_counts(table: Dataset, counts: list[int], box_counts: list[int], where: str) -> None:
    """Every row has as many boxes as regions."""
    for row, (n_regions, n_boxes) in enumerate(zip(counts, box_counts, strict=True)):
        if n_regions != n_boxes:
            image_id = str(table[row]["image_id"])
            raise ValueError(
                f"{where}: row {row} (image_id {image_id!r}) has {n_regions} regions but {n_boxes} boxes"
            )


def load_region_dataset(
    source: str | os.PathLike | Dataset | DatasetDict,
    features_column: str = "region_features",
    boxes_column: str | None = None,
    image_id_column: str = "image_id",
    captions_column: str = "captions",
    feature_dim: int | None = None,
    splits: Sequence[str] | None = None,
    **load_kwargs: Any,
) -> DatasetDict:
    """`convert_region_dataset` on a loaded dataset, a Hub id, or a local (Hub-layout or saved) dir."""
    name = source if isinstance(source, (str, os.PathLike)) else "dataset"
    raw = load_raw_dataset(source, **load_kwargs) if isinstance(source, (str, os.PathLike)) else source
    return convert_region_dataset(
        raw,
        features_column,
        boxes_column,
        image_id_column,
        captions_column,
        feature_dim,
        splits,
        os.fspath(name),
    )

"""The dataset schema every loader returns (see docs/design.md)."""

from __future__ import annotations

from datasets import Array2D, DatasetDict, Features, Image, Sequence, Value

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_ALIASES: dict[str, str] = {"dev": "validation", "val": "validation", "valid": "validation"}


def image_features() -> Features:
    """Features of an image-caption dataset: one row per image."""
    return Features({"image_id": Value("string"), "image": Image(), "captions": Sequence(Value("string"))})


def region_features(feature_dim: int, with_boxes: bool = False) -> Features:
    """Features of a precomputed-region dataset: `[N, feature_dim]` float32 per image (N varies)."""
    features = {
        "image_id": Value("string"),
        "region_features": Array2D(shape=(None, feature_dim), dtype="float32"),
        "captions": Sequence(Value("string")),
    }
    if with_boxes:
        features["region_boxes"] = Array2D(shape=(None, 4), dtype="float32")
    return Features(features)


def canonical_split(name: str) -> str:
    """Map `dev`/`val`/`valid` to `validation`; other names pass through unchanged."""
    return SPLIT_ALIASES.get(name, name)


def validate_dataset_dict(dataset: DatasetDict) -> DatasetDict:
    """Check `dataset` follows the schema; raise `ValueError` naming the split and column otherwise."""
    if not isinstance(dataset, DatasetDict):
        raise ValueError(f"expected a datasets.DatasetDict, got {type(dataset).__name__}")
    for split, table in dataset.items():
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        columns = set(table.column_names)
        missing = {"image_id", "captions"} - columns
        if missing:
            raise ValueError(f"split {split!r} lacks column(s) {sorted(missing)}; it has {sorted(columns)}")
        if ("image" in columns) == ("region_features" in columns):
            raise ValueError(
                f"split {split!r} must have exactly one of the columns 'image' and 'region_features', "
                f"it has {sorted(columns)}"
            )
    return dataset

"""Region-feature loaders: the SCAN/VSE∞ precomp folder and datasets with an `[N, D]` array column."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from datasets import Array2D, Dataset, DatasetDict, Features, List, Value

from granalign.data.loading import load_alignment_dataset
from granalign.data.precomputed import convert_region_dataset, load_precomp, load_region_dataset
from granalign.data.schema import validate_dataset_dict

R, D = 4, 8  # regions per image, feature dim


def _write_split(
    folder: Path, prefix: str, ims: np.ndarray, captions: list[str], ids: list[str] | None = None
):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{prefix}_ims.npy", ims)
    (folder / f"{prefix}_caps.txt").write_text("".join(c + "\n" for c in captions))
    if ids is not None:
        (folder / f"{prefix}_ids.txt").write_text("".join(i + "\n" for i in ids))


def _features(num_images: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_images, R, D)).astype(np.float32)


def _caps(prefix: str, num_images: int) -> list[str]:
    return [f"{prefix} image {i} caption {k}" for i in range(num_images) for k in range(5)]


def _precomp_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "coco_precomp"
    arrays = {
        "train": _features(3, 0),
        "dev": _features(2, 1),
        "test": _features(2, 2),
        "testall": _features(4, 3),
    }
    _write_split(folder, "train", arrays["train"], _caps("train", 3), ids=["101", "102", "103"])
    duplicated = np.repeat(arrays["dev"], 5, axis=0)  # one row per caption, as in some releases
    _write_split(folder, "dev", duplicated.astype(np.float64), _caps("dev", 2))
    _write_split(folder, "test", arrays["test"], _caps("test", 2))
    _write_split(folder, "testall", arrays["testall"], _caps("testall", 4))
    return folder, arrays


def test_precomp_folder_maps_splits_dedups_and_streams_to_arrow(tmp_path):
    folder, arrays = _precomp_dir(tmp_path)
    data = load_precomp(folder, cache_dir=str(tmp_path / "cache"))
    validate_dataset_dict(data)
    assert list(data) == ["train", "validation", "test"]
    assert data["train"]["image_id"] == ["101", "102", "103"]
    assert data["train"][2]["captions"] == [f"train image 2 caption {k}" for k in range(5)]
    assert data["train"].features["region_features"] == Array2D(shape=(None, D), dtype="float32")
    assert len(data["validation"]) == 2  # 10 duplicated rows read with stride 5
    assert data["validation"]["image_id"] == ["dev-0", "dev-1"]
    for split, prefix in [("train", "train"), ("validation", "dev"), ("test", "test")]:
        got = data[split].with_format("numpy")["region_features"]
        np.testing.assert_array_equal(np.stack(list(got)), arrays[prefix])
    assert all(Path(f["filename"]).is_relative_to(tmp_path / "cache") for f in data["train"].cache_files)
    assert data["train"].cache_files  # written to Arrow on disk, not held in memory


def test_precomp_testall_option_and_split_selection(tmp_path):
    folder, arrays = _precomp_dir(tmp_path)
    data = load_alignment_dataset(
        folder, splits=["test"], test_split="testall", cache_dir=str(tmp_path / "cache")
    )
    assert list(data) == ["test"] and len(data["test"]) == 4
    np.testing.assert_array_equal(
        np.stack(list(data["test"].with_format("numpy")["region_features"])), arrays["testall"]
    )
    (folder / "test_ims.npy").unlink()
    (folder / "dev_ims.npy").unlink()
    assert len(load_precomp(folder, splits=["test"], cache_dir=str(tmp_path / "cache"))["test"]) == 4
    with pytest.raises(ValueError, match=r"has no split 'dev'; available splits: \['test', 'train'\]"):
        load_precomp(folder, splits=["dev"], cache_dir=str(tmp_path / "cache"))


def test_precomp_cache_follows_changed_files(tmp_path):
    folder = tmp_path / "f30k_precomp"
    cache = str(tmp_path / "cache")
    _write_split(folder, "test", _features(2, 0), _caps("test", 2))
    first = load_precomp(folder, cache_dir=cache)["test"]
    replacement = _features(2, 9)  # same shape, ids and captions: only the file's content changes
    np.save(folder / "test_ims.npy", replacement)
    stat = (folder / "test_ims.npy").stat()
    os.utime(folder / "test_ims.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load_precomp(folder, cache_dir=cache)["test"]
    assert first.cache_files != second.cache_files
    np.testing.assert_array_equal(np.stack(list(second.with_format("numpy")["region_features"])), replacement)


def test_precomp_arrays_are_memory_mapped(tmp_path, monkeypatch):
    folder = tmp_path / "f30k_precomp"
    _write_split(folder, "test", _features(2, 0), _caps("test", 2))
    modes = []
    real_load = np.load

    def recording_load(path, *args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", recording_load)
    load_precomp(folder, cache_dir=str(tmp_path / "cache"))
    assert modes and set(modes) == {"r"}


def test_precomp_bad_inputs_name_the_problem(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="precomp directory"):
        load_precomp(tmp_path / "absent")
    folder = tmp_path / "bad"
    _write_split(folder, "test", _features(2, 0), _caps("test", 2)[:7])
    with pytest.raises(ValueError, match=r"test_ims\.npy has 2 rows but the captions file has 7 lines"):
        load_precomp(folder, cache_dir=cache)
    _write_split(folder, "test", _features(2, 0), _caps("test", 2))
    with pytest.raises(ValueError, match=r"feature dim 8 .* expected 2048"):
        load_precomp(folder, feature_dim=2048, cache_dir=cache)
    captions = _caps("test", 2)
    captions[6] = "  "
    (folder / "test_caps.txt").write_text("".join(c + "\n" for c in captions))
    with pytest.raises(ValueError, match=r"caption 1 of row 1 \(image_id 'test-1'\)"):
        load_precomp(folder, cache_dir=cache)
    (folder / "test_caps.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks '.*test_caps\.txt'"):
        load_precomp(folder, cache_dir=cache)
    (folder / "test_ims.npy").write_bytes(b"garbage")
    _write_split(folder, "test", _features(2, 0), _caps("test", 2))
    np.save(folder / "test_ims.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"test_ims\.npy is not a readable \.npy array"):
        load_precomp(folder, cache_dir=cache)


def _region_table(dims: tuple[int, ...] = (D, D, D), boxes: tuple[int, ...] = (3, 1, 2)) -> Dataset:
    rng = np.random.default_rng(0)
    counts = (3, 1, 2)
    return Dataset.from_dict(
        {
            "id": [7, 8, 9],
            "feats": [rng.standard_normal((n, d)).tolist() for n, d in zip(counts, dims, strict=True)],
            "boxes": [rng.uniform(0, 50, (n, 4)).tolist() for n in boxes],
            "texts": [["a"], ["b", "c"], ["d"]],
            "extra": [0, 0, 0],
        }
    )


def test_region_dataset_is_validated_and_cast_to_schema(tmp_path):
    table = _region_table()
    kwargs = {
        "features_column": "feats",
        "boxes_column": "boxes",
        "image_id_column": "id",
        "captions_column": "texts",
    }
    data = convert_region_dataset(DatasetDict({"dev": table}), **kwargs)
    validate_dataset_dict(data)
    split = data["validation"]
    assert split.features == Features(
        {
            "image_id": Value("string"),
            "region_features": Array2D(shape=(None, D), dtype="float32"),
            "captions": List(Value("string")),
            "region_boxes": Array2D(shape=(None, 4), dtype="float32"),
        }
    )
    assert split["image_id"] == ["7", "8", "9"]
    row = split.with_format("numpy")[1]
    assert row["region_features"].shape == (1, D) and row["region_features"].dtype == np.float32
    np.testing.assert_allclose(row["region_features"], np.asarray(table[1]["feats"]), rtol=1e-6)
    assert row["region_boxes"].shape == (1, 4)
    table.save_to_disk(tmp_path / "saved")
    loaded = load_alignment_dataset(tmp_path / "saved", **kwargs)
    assert list(loaded) == ["train"] and loaded["train"]["captions"] == [["a"], ["b", "c"], ["d"]]


def test_region_dataset_in_our_schema_is_detected_from_a_hub_layout_dir(tmp_path):
    features = Features(
        {
            "image_id": Value("string"),
            "region_features": Array2D(shape=(None, D), dtype="float32"),
            "captions": List(Value("string")),
        }
    )
    rows = {"image_id": ["x", "y"], "region_features": list(_features(2, 4)), "captions": [["p"], ["q"]]}
    (tmp_path / "repo" / "data").mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(
        tmp_path / "repo" / "data" / "test-00000-of-00001.parquet"
    )
    data = load_alignment_dataset(tmp_path / "repo", cache_dir=str(tmp_path / "cache"))
    assert list(data) == ["test"] and data["test"].features == features
    with pytest.raises(ValueError, match=r"holds region features; option\(s\) \['image_root'\]"):
        load_alignment_dataset(tmp_path / "repo", image_root=tmp_path, cache_dir=str(tmp_path / "cache"))


def test_region_dataset_bad_rows_are_named(tmp_path):
    kwargs = {"features_column": "feats", "image_id_column": "id", "captions_column": "texts"}
    with pytest.raises(
        ValueError, match=r"row 1 \(image_id '8'\) has 'region_features' vectors of length 5; expected 8"
    ):
        convert_region_dataset(_region_table(dims=(D, 5, D)), **kwargs)
    with pytest.raises(ValueError, match="expected 16"):
        convert_region_dataset(_region_table(), feature_dim=16, **kwargs)
    with pytest.raises(ValueError, match=r"row 2 \(image_id '9'\) has 2 regions but 1 boxes"):
        convert_region_dataset(_region_table(boxes=(3, 1, 1)), boxes_column="boxes", **kwargs)
    empty = Dataset.from_dict({"id": ["e"], "feats": [[]], "texts": [["t"]]})
    with pytest.raises(ValueError, match=r"row 0 \(image_id 'e'\) has an empty 'region_features' array"):
        convert_region_dataset(empty, **kwargs)
    text = Dataset.from_dict({"id": ["s"], "feats": ["not an array"], "texts": [["t"]]})
    with pytest.raises(
        ValueError, match=r"column 'region_features' has type string; expected an \[N, D\] array"
    ):
        convert_region_dataset(text, **kwargs)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['feats'\]"):
        load_region_dataset(Dataset.from_dict({"id": [1], "texts": [["t"]]}), **kwargs)

"""Image-caption loaders: Karpathy JSON, Hub schemas, image folders, image checks, the dispatcher."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

from granalign.data.checks import check_images, check_rows, resolve_splits
from granalign.data.hub_schemas import load_hub_dataset
from granalign.data.imagefolder import load_imagefolder
from granalign.data.karpathy import expected_split_sizes, load_karpathy
from granalign.data.loading import detect_kind, load_alignment_dataset
from granalign.data.schema import validate_dataset_dict


def _png(path: Path, color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (6, 4), color).save(path, format="PNG")  # lossless whatever the suffix
    return path


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (6, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _color(dataset: Dataset, row: int) -> tuple[int, ...]:
    return dataset[row]["image"].convert("RGB").getpixel((0, 0))


# ---------------------------------------------------------------- Karpathy JSON

COCO_ENTRIES = [  # (split, filepath, filename, cocoid, color)
    ("train", "train2014", "a.jpg", 11, (10, 0, 0)),
    ("restval", "val2014", "b.jpg", 12, (20, 0, 0)),
    ("val", "val2014", "c.jpg", 13, (30, 0, 0)),
    ("test", "val2014", "d.jpg", 14, (40, 0, 0)),
    ("train", "train2014", "e.jpg", 15, (50, 0, 0)),
]


def _coco_json(tmp_path: Path, dataset: str = "coco", blank: bool = False) -> tuple[Path, Path]:
    root = tmp_path / "coco"
    images = []
    for imgid, (split, folder, name, cocoid, color) in enumerate(COCO_ENTRIES):
        _png(root / folder / name, color)
        sentences = [{"raw": f"{name} caption {k}", "tokens": []} for k in range(2)]
        if blank and cocoid == 13:
            sentences[1]["raw"] = "   "
        images.append(
            {"filepath": folder, "filename": name, "split": split, "imgid": imgid, "cocoid": cocoid}
        )
        images[-1]["sentences"] = sentences
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": dataset, "images": images}))
    return path, root


def test_karpathy_coco_maps_splits_folds_restval_and_builds_paths(tmp_path):
    path, root = _coco_json(tmp_path)
    data = load_karpathy(path, root)
    validate_dataset_dict(data)
    assert list(data) == ["train", "validation", "test"]
    assert data["train"]["image_id"] == ["11", "12", "15"]  # restval folded in, source order
    assert data["validation"]["image_id"] == ["13"] and data["test"]["image_id"] == ["14"]
    assert data["train"][1]["captions"] == ["b.jpg caption 0", "b.jpg caption 1"]
    assert data["train"].features["image"] == Image()
    raw = data["train"].cast_column("image", Image(decode=False))
    assert raw[1]["image"]["path"] == str(root / "val2014" / "b.jpg")
    assert _color(data["test"], 0) == (40, 0, 0)


def test_karpathy_can_exclude_restval_and_pick_splits(tmp_path):
    path, root = _coco_json(tmp_path)
    data = load_karpathy(path, root, splits=["train", "val"], include_restval=False)
    assert list(data) == ["train", "validation"]
    assert data["train"]["image_id"] == ["11", "15"]


def test_karpathy_flickr_uses_root_filename_and_imgid(tmp_path):
    root = tmp_path / "flickr"
    _png(root / "1000.jpg", (1, 2, 3))
    entry = {"filename": "1000.jpg", "split": "test", "imgid": 7, "sentences": [{"raw": "a dog"}]}
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": [entry]}))
    data = load_karpathy(path, root)
    assert data["test"]["image_id"] == ["7"]
    assert _color(data["test"], 0) == (1, 2, 3)
    with pytest.raises(ValueError, match=r"has no split 'train'; available splits: \['test'\]"):
        load_karpathy(path, root, splits=["train"])


def test_standard_karpathy_sizes_are_documented_and_deviations_warned(tmp_path, caplog):
    assert expected_split_sizes("flickr30k") == {"train": 29_000, "validation": 1_014, "test": 1_000}
    assert expected_split_sizes("coco") == {"train": 113_287, "validation": 5_000, "test": 5_000}
    assert expected_split_sizes("coco", include_restval=False)["train"] == 82_783
    path, root = _coco_json(tmp_path)
    with caplog.at_level(logging.WARNING, logger="granalign.data.karpathy"):
        load_karpathy(path, root)
    assert "standard Karpathy coco split has 113287" in caplog.text


def test_karpathy_missing_images_are_named_or_skipped_and_counted(tmp_path, caplog):
    path, root = _coco_json(tmp_path)
    (root / "val2014" / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 image files do not exist.*val2014/b\.jpg"):
        load_karpathy(path, root)
    with caplog.at_level(logging.WARNING, logger="granalign.data.checks"):
        data = load_karpathy(path, root, skip_missing=True)
    assert data["train"]["image_id"] == ["11", "15"]
    assert "skipped 1 of 3 rows" in caplog.text


def test_karpathy_bad_inputs_name_the_problem(tmp_path):
    path, root = _coco_json(tmp_path, blank=True)
    with pytest.raises(ValueError, match=r"caption 1 of row 0 \(image_id '13'\)"):
        load_karpathy(path, root)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_karpathy(tmp_path / "nope.json", root)
    with pytest.raises(FileNotFoundError, match="image root"):
        load_karpathy(path, tmp_path / "no_root")
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"images": [{"filename": "a.jpg", "split": "holdout", "imgid": 0, "sentences": []}]})
    )
    with pytest.raises(ValueError, match="'holdout' is not one of"):
        load_karpathy(bad, root)


def test_resolve_splits_and_check_rows_messages():
    assert resolve_splits(["test", "val", "train"], None, "x") == ["train", "validation", "test"]
    with pytest.raises(
        ValueError, match=r"x has no split 'validation'; available splits: \['test', 'train'\]"
    ):
        resolve_splits(["train", "test"], ["validation"], "x")
    with pytest.raises(ValueError, match="image_id 'a' appears in rows 0 and 1"):
        check_rows(["a", "a"], [["x"], ["y"]], "w")
    with pytest.raises(ValueError, match=r"row 1 \(image_id 'b'\) has no captions"):
        check_rows(["a", "b"], [["x"], []], "w")


# ---------------------------------------------------------------- Hub schemas on local Hub-layout dirs


def _flickr_hub_dir(tmp_path: Path) -> Path:
    features = Features(
        {
            "image": Image(),
            "caption": List(Value("string")),
            "sentids": List(Value("string")),
            "split": Value("string"),
            "img_id": Value("string"),
            "filename": Value("string"),
        }
    )
    splits = ["train", "val", "test", "train"]
    rows = {
        "image": [{"bytes": _png_bytes((i * 10, 0, 0)), "path": f"{i}.jpg"} for i in range(4)],
        "caption": [[f"img {i} cap {k}" for k in range(5)] for i in range(4)],
        "sentids": [[str(5 * i + k) for k in range(5)] for i in range(4)],
        "split": splits,
        "img_id": [str(i) for i in range(4)],
        "filename": [f"{i}.jpg" for i in range(4)],
    }
    repo = tmp_path / "flickr30k"
    (repo / "data").mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(repo / "data" / "test-00000-of-00001.parquet")
    return repo


def test_hub_flickr30k_schema_is_partitioned_by_split_column(tmp_path):
    repo = _flickr_hub_dir(tmp_path)
    data = load_hub_dataset(repo, cache_dir=str(tmp_path / "cache"))
    validate_dataset_dict(data)
    assert list(data) == ["train", "validation", "test"]
    assert data["train"]["image_id"] == ["0", "3"]
    assert data["validation"]["image_id"] == ["1"]
    assert data["test"][0]["captions"] == [f"img 2 cap {k}" for k in range(5)]
    assert data["train"].column_names == ["image_id", "image", "captions"]
    assert _color(data["train"], 1) == (30, 0, 0)  # embedded bytes decode
    assert not list((tmp_path / "cache").rglob("cache-*.arrow"))  # image bytes were not rewritten
    only = load_alignment_dataset(repo, splits=["test"], cache_dir=str(tmp_path / "cache"))
    assert list(only) == ["test"]


def _coco_hub_dir(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "coco_images"
    repo = tmp_path / "coco-karpathy"
    (repo / "data").mkdir(parents=True)
    layout = {"train": [("train", 1), ("restval", 2)], "validation": [("val", 3)], "test": [("test", 4)]}
    for hub_split, rows in layout.items():
        columns = {"filepath": [], "filename": [], "sentences": [], "split": [], "cocoid": [], "url": []}
        for split, cocoid in rows:
            folder = "train2014" if split == "train" else "val2014"
            _png(root / folder / f"{cocoid}.jpg", (cocoid, 0, 0))
            columns["filepath"].append(folder)
            columns["filename"].append(f"{cocoid}.jpg")
            columns["sentences"].append([f"coco {cocoid} a", f"coco {cocoid} b"])
            columns["split"].append(split)
            columns["cocoid"].append(cocoid)
            columns["url"].append(f"http://example.invalid/{cocoid}.jpg")
        Dataset.from_dict(columns).to_parquet(repo / "data" / f"{hub_split}-00000-of-00001.parquet")
    return repo, root


def test_hub_coco_karpathy_schema_needs_image_root_and_folds_restval(tmp_path):
    repo, root = _coco_hub_dir(tmp_path)
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="ships no images; pass image_root"):
        load_hub_dataset(repo, cache_dir=cache)
    data = load_alignment_dataset(repo, image_root=root, cache_dir=cache)
    validate_dataset_dict(data)
    assert data["train"]["image_id"] == ["1", "2"]
    assert data["validation"]["captions"] == [["coco 3 a", "coco 3 b"]]
    assert _color(data["test"], 0) == (4, 0, 0)
    no_restval = load_hub_dataset(repo, image_root=root, include_restval=False, cache_dir=cache)
    assert no_restval["train"]["image_id"] == ["1"]
    (root / "val2014" / "3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"val2014/3\.jpg"):
        load_hub_dataset(repo, image_root=root, cache_dir=cache)


def test_hub_own_schema_from_saved_dir_and_bad_sources(tmp_path):
    table = Dataset.from_dict(
        {"image_id": [5], "image": [str(_png(tmp_path / "x.png", (9, 9, 9)))], "captions": [["hello"]]},
        features=Features({"image_id": Value("int64"), "image": Image(), "captions": List(Value("string"))}),
    )
    DatasetDict({"val": table}).save_to_disk(tmp_path / "saved")
    data = load_alignment_dataset(tmp_path / "saved")
    assert list(data) == ["validation"] and data["validation"]["image_id"] == ["5"]
    blank = Dataset.from_dict(
        {"image_id": ["q"], "image": [str(tmp_path / "x.png")], "captions": [["ok", ""]]}
    )
    blank.cast_column("image", Image()).save_to_disk(tmp_path / "blank")
    with pytest.raises(ValueError, match=r"caption 1 of row 0 \(image_id 'q'\)"):
        load_hub_dataset(tmp_path / "blank")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_hub_dataset(tmp_path / "does_not_exist")
    Dataset.from_dict({"foo": [1]}).save_to_disk(tmp_path / "odd")
    with pytest.raises(ValueError, match=r"columns \['foo'\] match no known schema"):
        load_hub_dataset(tmp_path / "odd")
    with pytest.raises(ValueError, match=r"has no split 'train'; available splits: \['validation'\]"):
        load_hub_dataset(tmp_path / "saved", splits=["train"])


# ---------------------------------------------------------------- image folders


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_imagefolder_split_subfolders_and_grouped_caption_rows(tmp_path):
    folder = tmp_path / "folder"
    for split, color in [("train", 10), ("val", 20), ("test", 30)]:
        _png(folder / split / "a.png", (color, 0, 0))
        _png(folder / split / "b.png", (color, 1, 0))
        rows = [
            {"file_name": "a.png", "caption": f"{split} a 1"},
            {"file_name": "b.png", "caption": f"{split} b 1"},
            {"file_name": "a.png", "caption": f"{split} a 2"},
        ]
        _write_jsonl(folder / split / "metadata.jsonl", rows)
    data = load_alignment_dataset(folder, cache_dir=str(tmp_path / "cache"))
    validate_dataset_dict(data)
    assert list(data) == ["train", "validation", "test"]
    assert data["validation"]["image_id"] == ["val/a.png", "val/b.png"]
    assert data["validation"]["captions"] == [["val a 1", "val a 2"], ["val b 1"]]
    assert _color(data["test"], 1) == (30, 1, 0)


def test_imagefolder_flat_csv_and_caption_lists(tmp_path):
    flat = tmp_path / "flat"
    _png(flat / "x.png", (1, 1, 1))
    _png(flat / "y.png", (2, 2, 2))
    (flat / "metadata.csv").write_text('file_name,text\nx.png,"one, with comma"\ny.png,two\nx.png,three\n')
    data = load_imagefolder(flat, single_split="test", cache_dir=str(tmp_path / "cache"))
    assert list(data) == ["test"]
    assert data["test"]["captions"] == [["one, with comma", "three"], ["two"]]
    listed = tmp_path / "listed"
    _png(listed / "x.png", (1, 1, 1))
    _write_jsonl(listed / "metadata.jsonl", [{"file_name": "x.png", "image_id": 42, "captions": ["p", "q"]}])
    data = load_imagefolder(listed, cache_dir=str(tmp_path / "cache"))
    assert data["train"]["image_id"] == ["42"] and data["train"]["captions"] == [["p", "q"]]


def test_imagefolder_bad_inputs_name_the_problem(tmp_path):
    cache = str(tmp_path / "cache")
    folder = tmp_path / "folder"
    _png(folder / "x.png", (1, 1, 1))
    with pytest.raises(FileNotFoundError, match=r"has no metadata\.jsonl"):
        load_imagefolder(folder, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_imagefolder(tmp_path / "absent")
    _write_jsonl(
        folder / "metadata.jsonl",
        [{"file_name": "x.png", "caption": "ok"}, {"file_name": "gone.png", "caption": "c"}],
    )
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        load_imagefolder(folder, cache_dir=cache)
    assert len(load_imagefolder(folder, skip_missing=True, cache_dir=cache)["train"]) == 1
    _write_jsonl(folder / "metadata.jsonl", [{"file_name": "x.png", "caption": " "}])
    with pytest.raises(ValueError, match=r"image_id 'x\.png'"):
        load_imagefolder(folder, cache_dir=cache)
    _write_jsonl(folder / "metadata.jsonl", [{"file_name": "x.png", "label": "cat"}])
    with pytest.raises(ValueError, match=r"none of the caption columns.*'label'"):
        load_imagefolder(folder, cache_dir=cache)


# ---------------------------------------------------------------- image readability


def test_check_images_names_bad_rows_or_skips_and_counts(tmp_path, caplog):
    good = _png(tmp_path / "good.png", (5, 5, 5))
    truncated = tmp_path / "truncated.png"
    PILImage.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    split = Dataset.from_dict(
        {"image_id": ["g", "t", "x", "b"], "image": [str(good), str(truncated), str(garbage), None]},
        features=Features({"image_id": Value("string"), "image": Image()}),
    )
    split = split.add_column("captions", [["c"]] * 4)
    with pytest.raises(
        ValueError, match=r"row 1 \(image_id 't', file '.*truncated\.png'\) is not a readable image"
    ):
        check_images(split)
    with caplog.at_level(logging.WARNING, logger="granalign.data.checks"):
        kept, num_bad = check_images(split, skip_bad=True, num_threads=2)
    assert num_bad == 3 and kept["image_id"] == ["g"]
    assert "skipped 3 of 4 rows" in caplog.text
    same, zero = check_images(kept)
    assert zero == 0 and same is kept
    embedded = Dataset.from_dict(
        {"image_id": ["e"], "image": [{"bytes": b"\x89PNG broken", "path": None}]},
        features=Features({"image_id": Value("string"), "image": Image()}),
    )
    with pytest.raises(ValueError, match=r"row 0 \(image_id 'e', file None\)"):
        check_images(embedded)


# ---------------------------------------------------------------- dispatcher


def test_detect_kind_and_dispatch_errors(tmp_path):
    path, _ = _coco_json(tmp_path)
    assert detect_kind(path) == "karpathy"
    (tmp_path / "split" / "train").mkdir(parents=True)
    (tmp_path / "split" / "train" / "metadata.csv").write_text("file_name,caption\n")
    assert detect_kind(tmp_path / "split") == "imagefolder"
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "test_ims.npy").write_bytes(b"")
    assert detect_kind(tmp_path / "pre") == "precomp"
    assert detect_kind("nlphuji/flickr30k") == "hub"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt' is a file"):
        detect_kind(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="unknown kind 'zip'"):
        load_alignment_dataset(path, kind="zip")

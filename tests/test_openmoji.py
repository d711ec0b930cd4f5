"""The OpenMoji source (`granalign.data.openmoji`) on a tiny fake npm package written into tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from datasets import Image as ImageFeature

pytest.importorskip("cairosvg", reason="needs the `real` extra (cairosvg + cairocffi)")

from rendered_sources import load_with_summary, rows

from granalign.data import loading
from granalign.data import openmoji as om
from granalign.data.captions import caption_key
from granalign.data.schema import SPLITS


def emoji_svg(index: int) -> str:
    """An OpenMoji-style 72-unit SVG, different for every `index` (colour and position)."""
    colour = f"#{(index * 2654435761) % 0xFFFFFF:06x}"
    x, y = 10 + index % 7, 12 + index % 5
    return (
        '<svg id="emoji" viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">\n'
        f'  <g id="color"><rect x="{x}" y="{y}" width="40" height="30" fill="{colour}"/></g>\n'
        f'  <g id="line"><circle cx="36" cy="36" r="23" fill="none" stroke="#000" stroke-width="2"/></g>\n'
        "</svg>\n"
    )


def entry(hexcode: str, annotation: str, group: str = "people-body", **extra) -> dict:
    return {
        "hexcode": hexcode,
        "annotation": annotation,
        "group": group,
        "tags": "",
        "openmoji_tags": "",
        **extra,
    }


def make_package(
    root: Path, entries: list[dict], drawings: dict[str, int] | None = None, skip_svg=()
) -> Path:
    """An unpacked `openmoji` npm package: `data/openmoji.json` plus `color/svg/<hexcode>.svg` per entry
    (drawing `drawings[hexcode]`, else the entry's index; none for the hexcodes in `skip_svg`)."""
    (root / "data").mkdir(parents=True)
    (root / "color" / "svg").mkdir(parents=True)
    (root / "data" / "openmoji.json").write_text(json.dumps(entries), encoding="utf-8")
    for index, item in enumerate(entries):
        if item["hexcode"] not in skip_svg:
            drawing = (drawings or {}).get(item["hexcode"], index)
            (root / "color" / "svg" / f"{item['hexcode']}.svg").write_text(
                emoji_svg(drawing), encoding="utf-8"
            )
    return root


def many(count: int, captions: int) -> list[dict]:
    """`count` entries over `captions` distinct annotations."""
    return [entry(f"E{i:03X}", f"person {i % captions}: medium skin tone") for i in range(count)]


OWN_SUMMARY = {
    "entries": r"(\d+) entries",
    "skipped": r"(\d+) skipped \(group component\)",
    "without_svg": r"(\d+) without SVG",
    "without_annotation": r"(\d+) without annotation",
}


def load(package: Path, cache: Path, caplog: pytest.LogCaptureFixture, **kwargs):
    """`load_openmoji` plus the counts of its summary line."""
    return load_with_summary(
        om.load_openmoji, om.__name__, " entries, ", OWN_SUMMARY, caplog, package, cache_dir=cache, **kwargs
    )


def caption_keys(dataset) -> dict[str, set[str]]:
    return {name: {caption_key(c[0]) for c in split["captions"]} for name, split in dataset.items()}


def test_schema_captions_and_skipped_entries(tmp_path, caplog):
    entries = [
        entry("1F93C-1F3FC-200D-2642-FE0F", "men  wrestling: medium-light skin tone, light skin tone"),
        entry("1F600", "grinning face", "smileys-emotion", tags="face, grin", openmoji_tags="smile, grin"),
        entry("1F3FB", "light skin tone", "component"),
        entry("1F9B1", "curly hair", "component"),
        entry("1F469-1F3FF-200D-1F9B1", "woman: dark skin tone, curly hair"),
        entry("E000", "goldfish", "extras-openmoji"),
        entry("E001", "   ", "extras-openmoji"),
    ]
    package = make_package(tmp_path / "package", entries, skip_svg={"E000"})
    dataset, counts = load(package, tmp_path / "cache", caplog, split_fractions=(1.0, 0.0, 0.0))
    assert list(dataset) == list(SPLITS)
    assert rows(dataset) == {
        "1F93C-1F3FC-200D-2642-FE0F": "men wrestling: medium-light skin tone, light skin tone",
        "1F600": "grinning face",
        "1F469-1F3FF-200D-1F9B1": "woman: dark skin tone, curly hair",
    }
    assert (counts["entries"], counts["skipped"], counts["without_svg"], counts["without_annotation"]) == (
        7,
        2,
        1,
        1,
    )
    assert (counts["train"], counts["validation"], counts["test"], counts["failed"]) == (3, 0, 0, 0)
    train = dataset["train"]
    assert set(train.column_names) >= {"image_id", "image", "captions"}
    image = train[0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert (pixels[0, 0] == 255).all() and (pixels != 255).any()  # drawing on white
    raw = train.cast_column("image", ImageFeature(decode=False))[0]["image"]
    assert raw["bytes"] is None and Path(raw["path"]).is_file()  # a path into the cache
    tagged, _ = load(package, tmp_path / "cache", caplog, caption="annotation+tags", splits=["train"])
    assert rows(tagged)["1F600"] == "grinning face, face, grin, smile"
    with pytest.raises(ValueError, match="caption must be one of"):
        om.load_openmoji(package, cache_dir=tmp_path / "cache", caption="tags")


def test_splits_are_disjoint_by_caption_capped_and_deduplicated(tmp_path, caplog):
    entries = many(40, 16)  # 8 captions 3 times, 8 twice
    entries += [entry("F000", "twin"), entry("F001", "twin")]  # drawn alike: exact duplicates
    package = make_package(tmp_path / "package", entries, drawings={"F000": 99, "F001": 99})
    fractions = (0.5, 0.25, 0.25)
    dataset, counts = load(package, tmp_path / "cache", caplog, split_fractions=fractions, max_per_caption=2)
    keys = caption_keys(dataset)
    assert all(keys.values())
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert counts["duplicates"] == 1
    # 16 captions at most 2 each: 32 of 40 plus one "twin"
    assert counts["capped"] == 8 and sum(len(s) for s in dataset.values()) == 33
    again, _ = load(package, tmp_path / "cache", caplog, split_fractions=fractions, max_per_caption=2)
    for name in SPLITS:
        assert again[name]["image_id"] == dataset[name]["image_id"]
    other, _ = load(package, tmp_path / "cache", caplog, split_fractions=fractions, split_seed=1)
    assert any(other[n]["image_id"] != dataset[n]["image_id"] for n in SPLITS)


def test_folds_test_every_caption_once_and_never_train_on_it(tmp_path, caplog):
    package = make_package(tmp_path / "package", many(30, 15))
    tested: list[str] = []
    for fold in range(3):
        dataset, _ = load(package, tmp_path / "cache", caplog, fold=fold, num_folds=3, max_per_caption=None)
        keys = caption_keys(dataset)
        assert not keys["train"] & (keys["validation"] | keys["test"])
        assert not keys["validation"] & keys["test"]
        assert sum(len(s) for s in dataset.values()) == 30
        tested.extend(keys["test"])
    assert sorted(tested) == sorted({caption_key(e["annotation"]) for e in many(30, 15)})  # each once
    with pytest.raises(ValueError, match=r"fold must be None or an int in \[0, 3\)"):
        om.load_openmoji(package, cache_dir=tmp_path / "cache", fold=3, num_folds=3)


def test_cache_is_reused(tmp_path, caplog, monkeypatch):
    package = make_package(tmp_path / "package", many(4, 4))
    cache = tmp_path / "cache"
    first, counts = load(package, cache, caplog)
    assert counts["rendered"] == 4
    pngs = sorted(cache.glob("render-32px-*/png/*/*.png"))
    assert len(pngs) == 4
    mtimes = [p.stat().st_mtime_ns for p in pngs]

    def no_render(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(om, "render_files", no_render)
    second, counts = load(package, cache, caplog)
    assert counts["rendered"] == 0
    assert [p.stat().st_mtime_ns for p in pngs] == mtimes
    for name in SPLITS:
        assert second[name]["image_id"] == first[name]["image_id"]


def test_missing_package_names_the_path_and_the_npm_command(tmp_path):
    missing = tmp_path / "node_modules" / "openmoji"
    with pytest.raises(FileNotFoundError) as error:
        om.load_openmoji(missing, cache_dir=tmp_path / "cache")
    assert str(missing) in str(error.value) and "npm install openmoji" in str(error.value)
    package = tmp_path / "package"
    (package / "color" / "svg").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"data/openmoji\.json.*npm install openmoji"):
        loading.load_alignment_dataset(package, kind="openmoji", cache_dir=tmp_path / "cache")
    (package / "data").mkdir()
    (package / "data" / "openmoji.json").write_text("[]", encoding="utf-8")
    (package / "color" / "svg").rmdir()
    with pytest.raises(FileNotFoundError, match=r"color/svg.*npm pack openmoji"):
        om.load_openmoji(package, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_load_alignment_dataset_reaches_the_loader(tmp_path, monkeypatch):
    assert "openmoji" in loading.KINDS
    package = make_package(tmp_path / "package", [entry("1F600", "grinning face")])
    assert loading.detect_kind(package) == "openmoji"
    args = {"kind": "openmoji", "cache_dir": os.fspath(tmp_path / "cache"), "image_size": 32, "num_proc": 1}
    dataset = loading.load_alignment_dataset(os.fspath(package), **args)  # as a recipe's data.args
    assert rows(dataset) == {"1F600": "grinning face"}
    calls = []
    monkeypatch.setattr(loading, "load_openmoji", lambda package, **kw: calls.append((package, kw)))
    loading.load_alignment_dataset("openmoji", image_size=64)
    loading.load_alignment_dataset(package, fold=1)
    assert calls == [("node_modules/openmoji", {"image_size": 64}), (package, {"fold": 1})]


def test_recipe_differs_from_the_openclipart_one_only_in_its_data():
    from granalign.training.recipe import read_recipe_file  # YAML only: test_recipes validates it

    configs = Path(__file__).resolve().parents[1] / "configs"
    moji = read_recipe_file(configs / "openmoji-minilm.yaml")
    clipart = read_recipe_file(configs / "openclipart-minilm.yaml")
    assert moji["data"]["source"] == "node_modules/openmoji" and moji["data"]["args"]["kind"] == "openmoji"
    assert set(moji) == set(clipart)
    different = {key for key in moji if moji[key] != clipart[key]}
    assert different == {"name", "output_dir", "data"}

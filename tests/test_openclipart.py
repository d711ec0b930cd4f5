"""The Open Clip Art source (`granalign.data.openclipart`) on tiny SVG files written into tmp_path."""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import Image as ImageFeature

pytest.importorskip("cairosvg", reason="needs the `real` extra (cairosvg + cairocffi)")

from rendered_sources import load_with_summary, rows

from granalign.data import loading
from granalign.data import openclipart as oc
from granalign.data.schema import SPLITS

RED = '<rect x="2" y="2" width="12" height="12" fill="#ff0000"/>'


def svg(title: str | None = "A thing", description: str = "", body: str = RED, size: str = "16") -> str:
    """A small SVG with Open Clip Art style RDF metadata (no `dc:title` when `title` is None)."""
    title_xml = "" if title is None else f"<dc:title>{title}</dc:title>"
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}">
  <metadata>
    <rdf:RDF xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/"
             xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
      <cc:Work rdf:about="">
        {title_xml}
        <dc:description>{description}</dc:description>
        <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  {body}
</svg>
"""


def box(index: int) -> str:
    """A drawing different for every `index` (colour and position), so no two are pixel duplicates."""
    return f'<rect x="{index % 5}" y="{index % 3}" width="8" height="8" fill="#{(index * 2654435761) % 0xFFFFFF:06x}"/>'


def write(root: Path, relpath: str, text: str) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


OWN_SUMMARY = {
    "found": r"(\d+) SVG files",
    "symlinks": r"(\d+) symlinks skipped",
    "unreadable": r"(\d+) unreadable",
    "untitled": r"(\d+) without title",
}


def load(root: Path, cache: Path, caplog: pytest.LogCaptureFixture, **kwargs):
    """`load_openclipart` plus the counts of its summary line."""
    return load_with_summary(
        oc.load_openclipart, oc.__name__, "SVG files", OWN_SUMMARY, caplog, root, cache_dir=cache, **kwargs
    )


def paths(split) -> list[str]:
    return [image["path"] for image in split.cast_column("image", ImageFeature(decode=False))["image"]]


def fixed_order(relpaths):
    return sorted(relpaths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())


def test_caption_is_long_description_else_title_and_untitled_files_are_skipped(tmp_path, caplog):
    root = tmp_path / "svg"
    write(root, "a/long.svg", svg("Red box", "a red box on a  white\n page", box(1)))
    write(root, "a/short.svg", svg("Blue box", "three words only", box(2)))
    write(root, "b/perl.svg", svg("Green box", "HASH(0x55d0c8e0) and more words", box(3)))
    write(root, "b/spaces.svg", svg("  Yellow\n   box ", "", box(4)))
    write(root, "b/untitled.svg", svg(None, "no title here", box(5)))
    write(root, "b/described.svg", svg(None, "a long description without title", box(7)))
    write(root, "b/perl-title.svg", svg("HASH(0x8589dd0)", "", box(6)))
    dataset, counts = load(root, tmp_path / "cache", caplog)
    assert rows(dataset) == {
        "a/long.svg": "a red box on a white page",
        "a/short.svg": "Blue box",
        "b/perl.svg": "Green box",
        "b/spaces.svg": "Yellow box",
        "b/described.svg": "a long description without title",
    }
    assert counts["found"] == 7
    assert counts["untitled"] == 2


def test_per_caption_cap_keeps_the_first_files_in_a_fixed_order(tmp_path, caplog):
    root = tmp_path / "svg"
    names = [f"stars/star{i}.svg" for i in range(7)]
    titles = ["Star", "star", "STAR ", " Star", "star", "Star", "Star"]  # one caption up to case/space
    for i, (name, title) in enumerate(zip(names, titles, strict=True)):
        write(root, name, svg(title, "", box(i)))
    write(root, "moon.svg", svg("Moon", "", box(9)))
    dataset, counts = load(root, tmp_path / "cache", caplog, max_per_caption=3)
    kept = set(rows(dataset))
    assert kept == {"moon.svg", *fixed_order(names)[:3]}
    assert counts["capped"] == 4
    # the order is a property of the paths, not of file creation order or of the listing
    limited, counts = load(root, tmp_path / "cache", caplog, max_per_caption=3, limit=2)
    assert set(rows(limited)) == set(fixed_order([*fixed_order(names)[:3], "moon.svg"])[:2])
    assert counts["selected"] == 2


def test_symlinks_are_skipped(tmp_path, caplog):
    root = tmp_path / "svg"
    real = write(root, "animals/cat.svg", svg("Cat", "", box(1)))
    (root / "pets").mkdir()
    os.symlink(real, root / "pets" / "cat.svg")
    dataset, counts = load(root, tmp_path / "cache", caplog)
    assert list(rows(dataset)) == ["animals/cat.svg"]
    assert (counts["found"], counts["symlinks"]) == (1, 1)


def test_illustrator_internal_entities_are_expanded_and_external_ones_never_resolved(tmp_path, caplog):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET", encoding="utf-8")
    doctype = f"""<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.0//EN" "http://www.w3.org/TR/2001/REC-SVG-20010904/DTD/svg10.dtd" [
\t<!ENTITY ns_ai "http://ns.adobe.com/AdobeIllustrator/10.0/">
\t<!ENTITY ns_svg "http://www.w3.org/2000/svg">
\t<!ENTITY ns_xlink 'http://www.w3.org/1999/xlink'>
\t<!ENTITY leak SYSTEM "{secret.as_uri()}">
]>"""
    text = svg("Floppy &leak;", "", box(1)).replace('<?xml version="1.0" encoding="UTF-8"?>', doctype)
    text = text.replace('xmlns="http://www.w3.org/2000/svg"', 'xmlns="&ns_svg;" xmlns:i="&ns_ai;"')
    root = tmp_path / "svg"
    write(root, "office/floppy.svg", text)
    dataset, counts = load(root, tmp_path / "cache", caplog)
    assert rows(dataset) == {"office/floppy.svg": "Floppy"}
    assert counts["failed"] == 0
    split = next(s for s in dataset.values() if len(s))
    pixels = np.asarray(split[0]["image"])
    assert (pixels != 255).any()  # the drawing, not a blank page


def test_broken_files_are_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "svg"
    write(root, "good.svg", svg("Good", "", box(1)))
    write(root, "truncated.svg", svg("Truncated", "", box(2))[:300])
    write(root, "percent.svg", svg("Percent", "", box(3), size="100%"))
    empty = '<defs><linearGradient id="g"><stop offset="0" stop-color="#000"/></linearGradient></defs>'
    write(root, "gradient-only.svg", svg("Gradient", "", empty))
    dataset, counts = load(root, tmp_path / "cache", caplog)
    assert list(rows(dataset)) == ["good.svg"]
    assert counts["unreadable"] == 1
    assert counts["failed"] == 2
    # failures are remembered: a second call does not try again
    _, counts = load(root, tmp_path / "cache", caplog)
    assert (counts["failed"], counts["rendered"]) == (2, 0)


def test_slow_and_crashing_files_are_stopped_and_the_rest_still_render(tmp_path, caplog, monkeypatch):
    root = tmp_path / "svg"
    for name in ["slow", "crash", "a", "b", "c"]:
        write(root, f"{name}.svg", svg(name.title(), "", box(len(name) + ord(name[0]))))
    render = oc._render_file

    def flaky(svg_path: str, png_path: str, image_size: int):  # runs in the (forked) workers
        if svg_path.endswith("slow.svg"):
            time.sleep(60)
        if svg_path.endswith("crash.svg"):
            os._exit(3)
        return render(svg_path, png_path, image_size)

    monkeypatch.setattr(oc, "_render_file", flaky)
    start = time.monotonic()
    dataset, counts = load(root, tmp_path / "cache", caplog, num_proc=2, render_timeout=4.0)
    assert time.monotonic() - start < 30  # well under the 60 s the slow file would take
    assert set(rows(dataset)) == {"a.svg", "b.svg", "c.svg"}
    assert (counts["failed"], counts["timeouts"]) == (2, 1)
    # a longer timeout than the one a file was stopped at tries that file again
    monkeypatch.setattr(oc, "_render_file", render)
    dataset, counts = load(root, tmp_path / "cache", caplog, render_timeout=20.0)
    assert "slow.svg" in rows(dataset)
    assert (counts["rendered"], counts["failed"]) == (1, 1)


def test_exact_duplicates_are_dropped(tmp_path, caplog):
    root = tmp_path / "svg"
    write(root, "one/apple.svg", svg("Apple", "", box(1)))
    write(root, "two/apple.svg", svg("apple ", "", box(1)) + "<!-- other bytes, same pixels -->")
    write(root, "pear.svg", svg("Pear", "", box(1)))  # same pixels, other caption: kept
    write(root, "three/apple.svg", svg("Apple", "", box(2)))  # same caption, other pixels: kept
    dataset, counts = load(root, tmp_path / "cache", caplog)
    kept = set(rows(dataset))
    assert counts["duplicates"] == 1
    first = fixed_order(["one/apple.svg", "two/apple.svg"])[0]
    assert kept == {first, "pear.svg", "three/apple.svg"}


def test_splits_are_disjoint_by_caption_and_deterministic(tmp_path, caplog):
    root = tmp_path / "svg"
    for i in range(40):
        title = f"Thing {i % 16}" if i % 2 else f"thing  {i % 16}"
        write(root, f"things/t{i:02d}.svg", svg(title, "", box(i)))
    fractions = (0.5, 0.25, 0.25)
    dataset, _ = load(root, tmp_path / "cache", caplog, split_fractions=fractions, max_per_caption=None)
    keys = {name: {oc.caption_key(c[0]) for c in split["captions"]} for name, split in dataset.items()}
    assert all(keys.values())
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert sum(len(s) for s in dataset.values()) == 40
    again, _ = load(root, tmp_path / "cache2", caplog, split_fractions=fractions, max_per_caption=None)
    for name in SPLITS:
        assert again[name]["image_id"] == dataset[name]["image_id"]
        assert again[name]["captions"] == dataset[name]["captions"]
    other, _ = load(root, tmp_path / "cache", caplog, split_fractions=fractions, split_seed=1)
    assert any(other[n]["image_id"] != dataset[n]["image_id"] for n in SPLITS)
    with pytest.raises(ValueError, match="split_fractions"):
        oc.load_openclipart(root, cache_dir=tmp_path / "cache", split_fractions=(0.8, 0.3, 0.1))


def test_folds_test_every_caption_once_and_never_train_on_it(tmp_path, caplog):
    root = tmp_path / "svg"
    for i in range(40):
        write(root, f"things/t{i:02d}.svg", svg(f"Thing {i % 20}", "", box(i)))
    tested: list[str] = []
    for fold in range(4):
        dataset, _ = load(root, tmp_path / "cache", caplog, fold=fold, num_folds=4, max_per_caption=None)
        keys = {name: {oc.caption_key(c[0]) for c in split["captions"]} for name, split in dataset.items()}
        assert (
            not keys["train"] & (keys["validation"] | keys["test"]) and not keys["validation"] & keys["test"]
        )
        assert sum(len(s) for s in dataset.values()) == 40
        tested.extend(keys["test"])
    assert sorted(tested) == sorted({oc.caption_key(f"Thing {i}") for i in range(20)})  # each exactly once
    with pytest.raises(ValueError, match=r"fold must be None or an int in \[0, 4\)"):
        oc.load_openclipart(root, cache_dir=tmp_path / "cache", fold=4, num_folds=4)
    with pytest.raises(ValueError, match="num_folds must be an int >= 3"):
        oc.load_openclipart(root, cache_dir=tmp_path / "cache", fold=0, num_folds=2)


def test_cache_is_reused_and_keyed_by_image_size(tmp_path, caplog, monkeypatch):
    root = tmp_path / "svg"
    for i in range(4):
        write(root, f"s{i}.svg", svg(f"Shape {i}", "", box(i)))
    cache = tmp_path / "cache"
    first, counts = load(root, cache, caplog, image_size=32)
    assert counts["rendered"] == 4
    pngs = sorted(cache.glob("render-32px-*/png/*/*.png"))
    assert len(pngs) == 4
    mtimes = [p.stat().st_mtime_ns for p in pngs]

    def no_render(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(oc, "render_files", no_render)
    second, counts = load(root, cache, caplog, image_size=32)
    assert counts["rendered"] == 0
    assert [p.stat().st_mtime_ns for p in pngs] == mtimes
    for name in SPLITS:
        assert second[name]["image_id"] == first[name]["image_id"]
        assert paths(second[name]) == paths(first[name])
    monkeypatch.undo()
    bigger, counts = load(root, cache, caplog, image_size=48)
    assert counts["rendered"] == 4
    folders = sorted(p.name for p in cache.glob("render-*"))
    assert (
        len(folders) == 2 and folders[0].startswith("render-32px-") and folders[1].startswith("render-48px-")
    )
    split = next(s for s in bigger.values() if len(s))
    assert split[0]["image"].size == (48, 48)
    # stored as file paths into the cache, not copied into the Arrow table
    raw = split.cast_column("image", ImageFeature(decode=False))[0]["image"]
    assert raw["bytes"] is None and Path(raw["path"]).parents[2].name.startswith("render-48px-")


def test_images_are_white_squares_cropped_to_the_drawing(tmp_path, caplog):
    root = tmp_path / "svg"
    wide = '<rect x="10" y="20" width="40" height="10" fill="#0000ff"/>'  # on a 64 x 64 page
    write(root, "wide.svg", svg("Wide", "", wide, size="64"))
    dataset, _ = load(root, tmp_path / "cache", caplog, image_size=40, split_fractions=(1.0, 0.0, 0.0))
    image = dataset["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (40, 40)
    pixels = np.asarray(image).astype(int)
    assert (pixels[0] == 255).all() and (pixels[-1] == 255).all()  # padding above and below: white
    middle = pixels[20]
    assert middle[0].tolist() == [0, 0, 255] and middle[-1].tolist() == [0, 0, 255]  # cropped: edge to edge
    band = (pixels[..., 2] > 128) & (pixels[..., 0] < 128)
    assert band.any(axis=1).sum() == 10  # 40 x 10 drawing, long side -> 40 px: 10 rows high


def test_oversized_pages_render_at_a_smaller_scale(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(oc, "MAX_RENDER_PIXELS", 10_000)  # a 200 x 200 page is 160,000 px at scale 2
    root = tmp_path / "svg"
    write(root, "poster.svg", svg("Poster", "", '<circle cx="100" cy="100" r="60" fill="#00ff00"/>', "200"))
    dataset, counts = load(root, tmp_path / "cache", caplog, split_fractions=(1.0, 0.0, 0.0))
    assert counts["failed"] == 0
    pixels = np.asarray(dataset["train"][0]["image"]).astype(int)
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 80)
    assert green[16, 16] and green.any(axis=0).sum() >= 30  # the circle fills the 32 px square


ANT_TEXT = (
    '<text style="font-size:8;font-family:Bitstream Vera Sans" transform="scale(0.234913)" x="41" y="38">Ant</text>'
    '<text style="font-size:12;font-family:helvetica" x="1" y="13">Helvetica ant</text>'
)
FLY_TEXT = (
    '<text style="font-size:12;font-family:Bitstream Vera Sans" transform="scale(1.98894)" x="2" y="12">Fly</text>'
    '<text style="font-size:12;font-family:Bitstream Vera Sans" transform="scale(0.701883)" x="5" y="35">Fly</text>'
)


def test_text_renders_as_in_a_fresh_process_whatever_was_rendered_before(tmp_path, caplog):
    # cairo caches fonts process-wide: without a reset after each file, "fly" rendered after "ant" (same
    # worker: num_proc=1, fixed order ant -> fly) comes out different from "fly" rendered alone
    assert fixed_order(["fly.svg", "ant.svg"]) == ["ant.svg", "fly.svg"]
    both, alone = tmp_path / "both", tmp_path / "alone"
    write(both, "ant.svg", svg("Ant", "", ANT_TEXT, "60"))
    for root in (both, alone):
        write(root, "fly.svg", svg("Fly", "", FLY_TEXT, "60"))
    kwargs = {"image_size": 224, "split_fractions": (1.0, 0.0, 0.0)}
    after_ant, _ = load(both, tmp_path / "cache-both", caplog, **kwargs)
    fresh, _ = load(alone, tmp_path / "cache-alone", caplog, **kwargs)
    fly = after_ant["train"]["image_id"].index("fly.svg")
    assert np.array_equal(
        np.asarray(after_ant["train"][fly]["image"]), np.asarray(fresh["train"][0]["image"])
    )


def test_missing_or_empty_folder_says_to_install_the_debian_package(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        oc.load_openclipart(missing, cache_dir=tmp_path / "cache")
    assert str(missing) in str(error.value) and "apt-get install openclipart-svg" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \.svg files.*apt-get download openclipart-svg"):
        oc.load_openclipart(tmp_path / "empty", cache_dir=tmp_path / "cache")


def test_missing_cairosvg_names_the_pip_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_cairosvg(name, *args, **kwargs):
        if name.startswith("cairosvg"):
            raise ImportError("No module named 'cairosvg'")
        return real_import(name, *args, **kwargs)

    write(tmp_path / "svg", "a.svg", svg("A", "", box(1)))
    monkeypatch.setattr(builtins, "__import__", without_cairosvg)
    with pytest.raises(ImportError, match=re.escape("pip install 'granalign[real]'")):
        oc.load_openclipart(tmp_path / "svg", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing cached without the renderer


def test_load_alignment_dataset_and_recipes_reach_the_loader(tmp_path, caplog, monkeypatch):
    from granalign.training.builders import load_recipe_dataset
    from granalign.training.recipe import DataRecipe

    assert "openclipart" in loading.KINDS
    root = tmp_path / "svg"
    write(root, "a.svg", svg("Anchor", "", box(1)))
    args = {
        "kind": "openclipart",
        "cache_dir": os.fspath(tmp_path / "cache"),
        "image_size": 32,
        "num_proc": 1,
    }
    dataset = load_recipe_dataset(DataRecipe(source=os.fspath(root), args=args))
    assert rows(dataset) == {"a.svg": "Anchor"}
    with pytest.raises(ValueError, match="svg_root"):
        loading.load_alignment_dataset(root, kind="openclipart", svg_root=root)
    calls = []
    monkeypatch.setattr(loading, "load_openclipart", lambda root, **kw: calls.append((root, kw)))
    loading.load_alignment_dataset("openclipart", image_size=64)
    loading.load_alignment_dataset("openclipart", kind="openclipart")
    assert calls == [("/usr/share/openclipart/svg", {"image_size": 64}), ("/usr/share/openclipart/svg", {})]

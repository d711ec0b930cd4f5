"""Explanation figures for every vision input type, training curves, the `explain` CLI and the Space app.

Figures are checked for what a reader needs: the expected size, real content (pixel variance, many
colours), titles naming every word, and numbers that agree with the model's own scoring.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from matplotlib.patches import Rectangle
from packaging.version import Version
from PIL import Image
from tiny_configs import WORDS, tiny_model

from granalign import GranAlignProcessor
from granalign.data.synthetic import SyntheticSceneSpec, generate_synthetic_scenes, render_scene
from granalign.viz import explain
from granalign.viz.cli_viz import add_demo_parser, add_explain_parser, load_model_and_processor
from granalign.viz.curves import plot_training_curves, training_curves_figure
from granalign.viz.explain import compute_explanation, group_words, infer_grid_shape
from granalign.viz.figures import DPI, FIGURE_NAMES, PANEL_INCHES, figure_kept_patches, figure_word_maps

CAPTION = "two red circles left of a blue square"
CAPTION_WORDS = ["two", "red", "circles", "left", "of", "a", "blue", "square"]
SCENE_SIZE = 96
REPO_ROOT = Path(__file__).resolve().parents[1]

# vision tower, processor output (height, width), expected token grid, prefix tokens
CASES = {
    "vit": ("vit", (32, 32), [4, 4], 1),
    "swin": ("swin", (32, 64), [4, 8], 0),
    "convnext": ("convnext", (64, 32), [8, 4], 0),
    "regions_with_boxes": (None, None, None, 0),
    "regions_without_boxes": (None, None, None, 0),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s"]) + "\n")
    return transformers.BertTokenizerFast(vocab=str(vocab))


def _processor(tokenizer, size):
    if size is None:
        return GranAlignProcessor(tokenizer=tokenizer, max_length=24)
    image_processor = transformers.ViTImageProcessorPil(size={"height": size[0], "width": size[1]})
    return GranAlignProcessor(image_processor, tokenizer, max_length=24)


@pytest.fixture(scope="module")
def scene():
    """A built-in scene: its picture and the pixel boxes of its objects."""
    record = generate_synthetic_scenes(SyntheticSceneSpec(num_train=0, num_validation=0, num_test=2)).splits[
        "test"
    ][0]
    boxes = np.array([obj.box(SCENE_SIZE) for obj in record.scene.objects], dtype=np.float32)
    return render_scene(record.scene, SCENE_SIZE), boxes


def _inputs(case, scene):
    image, boxes = scene
    if CASES[case][0] is not None:
        return {"image": image}
    features = torch.randn(len(boxes), 24, generator=torch.Generator().manual_seed(1)).numpy()
    if case == "regions_with_boxes":
        return {"image": image, "region_features": features, "region_boxes": boxes}
    return {"region_features": features}


def _assert_not_blank(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.std() > 15, f"{path.name} looks blank"
    packed = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)
    assert len(np.unique(packed)) > 50, f"{path.name} has too few colours"


@pytest.mark.parametrize("case", list(CASES))
def test_explain_writes_readable_figures_for_every_input_type(case, tokenizer, scene, tmp_path):
    vision, size, grid, prefix = CASES[case]
    model, processor = tiny_model(vision).eval(), _processor(tokenizer, size)
    paths = explain(model, processor, CAPTION, tmp_path, **_inputs(case, scene))
    assert set(paths) == {*FIGURE_NAMES, "summary"}
    summary = json.loads(paths["summary"].read_text())
    assert summary["words"] == CAPTION_WORDS  # WordPieces merged, [CLS]/[SEP] dropped
    expected_kind = {"regions_with_boxes": "boxes", "regions_without_boxes": "regions"}.get(case, "grid")
    assert summary["input_kind"] == expected_kind
    assert summary["grid_shape"] == grid
    assert summary["num_visual_units"] == (grid[0] * grid[1] if grid else len(scene[1]))
    assert len(summary["prefix_keep"]) == prefix

    for name in FIGURE_NAMES:
        width, height = Image.open(paths[name]).size
        assert [width, height] == summary["figure_sizes"][name]
        _assert_not_blank(paths[name])
    assert Image.open(paths["word_maps"]).size[1] > 2 * PANEL_INCHES * DPI  # 8 words: two rows of panels

    titles = summary["figures"]
    for word in CAPTION_WORDS:
        assert any(f"“{word}”" in title for title in titles["word_maps"]), word
    region_titles = [t for t in titles["regions"] if t.startswith("prompt ")]
    assert len(region_titles) == model.config.num_regions
    assert all("π=" in t and "σ²=" in t for t in region_titles)
    assert titles["kept_patches"][0].startswith("Significance adapter")
    assert f"{summary['score']:.3f}" in titles["levels"][0]

    # the levels and the score are the model's own
    batch = processor(
        text=[CAPTION],
        **({"images": [scene[0]]} if vision else {"regions": [_inputs(case, scene)["region_features"]]}),
    )
    with torch.no_grad():
        output = model(**batch)
    expected = output.level_scores[:, 0, 0].tolist()
    assert [summary["levels"][k] for k in ("original", "key", "uncertainty")] == pytest.approx(
        expected, abs=1e-5
    )
    score = output.logits_per_image[0, 0] / model.temperature_scale()
    assert summary["score"] == pytest.approx(score.item(), abs=1e-5)


def test_word_maps_are_cosines_of_merged_words_against_spatial_tokens(tokenizer, scene):
    model, processor = tiny_model("vit").eval(), _processor(tokenizer, (32, 32))
    explanation = compute_explanation(model, processor, CAPTION, image=scene[0])
    encoding = tokenizer(CAPTION, return_tensors="pt", return_token_type_ids=False)
    pieces = tokenizer.convert_ids_to_tokens(encoding["input_ids"][0])
    assert pieces[3:5] == ["circle", "##s"]
    with torch.no_grad():
        text = model.encode_text(encoding["input_ids"], encoding["attention_mask"])
        image = model.encode_image(pixel_values=processor(images=[scene[0]])["pixel_values"])
    patches = F.normalize(image.tokens[0, 1:], dim=-1)  # the ViT [CLS] token is not a patch
    cosine = F.normalize(text.tokens[0], dim=-1) @ patches.t()
    np.testing.assert_allclose(explanation.word_similarity[0], cosine[1].numpy(), atol=1e-5)  # "two"
    np.testing.assert_allclose(explanation.word_similarity[2], cosine[3:5].mean(0).numpy(), atol=1e-5)
    assert explanation.word_keep[2] == pytest.approx(text.keep_weights[0, 3:5].mean().item(), abs=1e-6)
    np.testing.assert_allclose(explanation.keep, image.keep_weights[0, 1:].numpy(), atol=1e-6)
    np.testing.assert_allclose(explanation.region_attention.sum(1), 1.0, atol=1e-5)
    assert explanation.prefix_keep == pytest.approx([image.keep_weights[0, 0].item()])


def test_boxes_are_drawn_and_regions_without_boxes_become_bars(tokenizer, scene):
    model, processor = tiny_model(None).eval(), _processor(tokenizer, None)
    inputs = _inputs("regions_with_boxes", scene)
    with_boxes = compute_explanation(model, processor, CAPTION, **inputs)
    kept = figure_kept_patches(with_boxes)
    boxes_axes = kept.axes[1]  # after the input picture
    assert sum(isinstance(p, Rectangle) for p in boxes_axes.patches) == len(scene[1])
    word_panel = figure_word_maps(with_boxes).axes[0]
    assert sum(isinstance(p, Rectangle) for p in word_panel.patches) == len(scene[1]) + 1  # + best box
    without = compute_explanation(model, processor, CAPTION, region_features=inputs["region_features"])
    bars = figure_kept_patches(without).axes[0]
    assert len(bars.patches) == len(scene[1])
    assert bars.get_xlabel() == "input region"
    np.testing.assert_allclose([p.get_height() for p in bars.patches], without.keep, atol=1e-6)


@pytest.mark.parametrize(
    ("tokens", "height", "width", "expected"),
    [
        (16, 32, 32, (4, 4)),
        (32, 32, 64, (4, 8)),
        (32, 64, 32, (8, 4)),
        (196, 224, 224, (14, 14)),
        (7, 9, 9, (1, 7)),
    ],
)
def test_infer_grid_shape(tokens, height, width, expected):
    assert infer_grid_shape(tokens, height, width) == expected


def test_group_words_without_offsets_merges_wordpieces(tokenizer):
    ids = tokenizer("red circles zebra", return_tensors="pt")["input_ids"]
    words = group_words(tokenizer, "red circles zebra", {"input_ids": ids})  # no fast-tokenizer offsets
    assert [w for w, _ in words] == ["red", "circles", "[UNK]"]
    assert words[1][1] == [2, 3]


def test_clear_errors_for_bad_inputs(tokenizer, scene, tmp_path):
    model, processor = tiny_model("vit").eval(), _processor(tokenizer, (32, 32))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.png"):
        compute_explanation(model, processor, CAPTION, image=tmp_path / "nowhere.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.png"):
        compute_explanation(model, processor, CAPTION, image=broken)
    with pytest.raises(ValueError, match="empty"):
        compute_explanation(model, processor, "   ", image=scene[0])
    with pytest.raises(ValueError, match="pass an image"):
        compute_explanation(model, processor, CAPTION)
    with pytest.raises(ValueError, match="region_features"):
        compute_explanation(tiny_model(None), _processor(tokenizer, None), CAPTION, image=scene[0])


def _history(with_dev: bool) -> list[dict]:
    rows = []
    for step in range(1, 61):
        rows.append(
            {
                "step": step,
                "epoch": (step - 1) // 20,
                "loss": 2.0 / step**0.5,
                "lr": 2e-4 * 0.3 ** (step // 30),
            }
        )
        if with_dev and step % 20 == 0:
            rows.append(
                {"step": step, "epoch": step // 20, "rsum": 100.0 + step, "i2t_r1": 1.0}
            )  # loop's dev rows
    return rows


def test_training_curves_png(tmp_path):
    path = plot_training_curves(_history(with_dev=True), tmp_path / "curves" / "training_curves.png")
    assert path.is_file() and Image.open(path).size == (round(13.5 * 110), round(3.8 * 110))
    _assert_not_blank(path)
    figure = training_curves_figure(_history(with_dev=True))
    loss_axes, lr_axes, dev_axes = figure.axes
    assert loss_axes.get_title() == "Training loss" and lr_axes.get_title() == "Learning rate"
    assert dev_axes.get_title() == "Dev rSum (best 160.0 at step 60)"
    np.testing.assert_allclose(loss_axes.lines[0].get_xdata(), np.arange(1, 61))
    np.testing.assert_allclose(dev_axes.lines[0].get_ydata(), [120.0, 140.0, 160.0])
    assert lr_axes.get_yscale() == "linear"
    before_eval = training_curves_figure(_history(with_dev=False))
    assert "no dev evaluation yet" in [t.get_text() for t in before_eval.axes[2].texts]


def test_training_curves_reject_bad_history(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"history\[1\]"):
        plot_training_curves([{"step": 1, "loss": 1.0}, {"loss": 0.5}], tmp_path / "x.png")


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("model")
    tiny_model("vit").save_pretrained(directory)
    _processor(tokenizer, (32, 32)).save_pretrained(directory)
    return directory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granalign")
    commands = parser.add_subparsers(dest="command", required=True)
    add_explain_parser(commands)
    add_demo_parser(commands)
    return parser


def test_explain_cli_writes_figures(saved_vit, scene, tmp_path):
    image = tmp_path / "scene.png"
    scene[0].save(image)
    out = tmp_path / "out"
    args = _parser().parse_args(
        ["explain", str(saved_vit), "--image", str(image), "--text", "a red circle", "--output-dir", str(out)]
    )
    assert args.func(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.png" for n in FIGURE_NAMES] + ["summary.json"]
    )
    missing = _parser().parse_args(
        ["explain", str(saved_vit), "--image", str(tmp_path / "no.png"), "--text", "x"]
    )
    with pytest.raises(FileNotFoundError, match=r"no\.png"):
        missing.func(missing)


def test_model_dir_without_weights_is_a_clear_error(saved_vit, tmp_path):
    shutil.copy(saved_vit / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_model_and_processor(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_processor(str(tmp_path / "missing"))


def test_demo_backend_ranks_like_the_model(saved_vit, scene):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'granalign[demo]')")
    from granalign.viz.demo import DemoBackend, parse_captions

    model, processor = load_model_and_processor(str(saved_vit), "cpu")
    captions = [CAPTION, "a small green star", "two dogs"]
    rows = DemoBackend(model, processor).rank(scene[0], "\n".join(captions) + "\n\n")
    batch = processor(text=captions, images=[scene[0]], padding="longest")
    with torch.no_grad():
        scores = model(**batch).logits_per_image[0] / model.temperature_scale()
    assert [row[1] for row in rows] == [captions[i] for i in torch.argsort(scores, descending=True).tolist()]
    assert [row[2] for row in rows] == pytest.approx(sorted(scores.tolist(), reverse=True), abs=1e-4)
    with pytest.raises(ValueError, match="no captions"):
        parse_captions(" \n ")


def test_space_app_builds_the_demo(saved_vit, monkeypatch):
    gradio = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'granalign[demo]')")
    spec = importlib.util.spec_from_file_location("space_app", REPO_ROOT / "spaces" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    monkeypatch.delenv(app.MODEL_VARIABLE, raising=False)
    with pytest.raises(ValueError, match=app.MODEL_VARIABLE):
        app.create_app()
    monkeypatch.setenv(app.MODEL_VARIABLE, str(saved_vit))
    monkeypatch.setenv("GRANALIGN_GALLERY_SIZE", "2")
    assert isinstance(app.create_app(), gradio.Blocks)


# ------------------------------------------------------------------------ demo search over a gallery index


@pytest.fixture(scope="module")
def gallery_index(saved_vit, tmp_path_factory):
    """Four built-in scenes as PNGs, indexed by the saved model twice: ids as full paths and as file names."""
    from granalign.retrieval import GalleryIndex, encode_images
    from granalign.viz.scene_gallery import example_scenes

    directory = tmp_path_factory.mktemp("gallery")
    (directory / "images").mkdir()
    files = []
    for scene in example_scenes(4, image_size=SCENE_SIZE):
        files.append(directory / "images" / f"{scene.image_id}.png")
        scene.image.save(files[-1])
    model, processor = load_model_and_processor(str(saved_vit), "cpu")
    outputs = encode_images(model, processor, files, progress=False)
    paths = GalleryIndex.build(model, outputs, [str(f) for f in files]).save(directory / "paths.safetensors")
    names = GalleryIndex.build(model, outputs, [f.stem for f in files]).save(directory / "names.safetensors")
    return model, processor, paths, names, directory / "images"


@pytest.mark.parametrize("mode", ["two-stage", "exhaustive"])
def test_index_search_returns_what_the_retrieval_api_returns(gallery_index, mode):
    from granalign.retrieval import GalleryIndex, encode_captions, search
    from granalign.viz.index_search import IndexImageSearch

    model, processor, paths, _, _ = gallery_index
    adapter = IndexImageSearch(model, processor, paths, mode=mode, shortlist=2)
    hits = adapter.search(f"  {CAPTION} ", 3)
    queries = encode_captions(model, processor, [CAPTION], progress=False)
    expected = search(model, GalleryIndex.load(paths), queries, k=3, mode=mode, shortlist=2)
    assert [hit.image_id for hit in hits] == expected.ids[0]
    assert [hit.score for hit in hits] == pytest.approx(expected.scores[0].tolist(), abs=1e-6)
    for hit in hits:  # the indexed picture itself
        assert isinstance(hit.image, Image.Image)
        np.testing.assert_array_equal(
            np.asarray(hit.image), np.asarray(Image.open(hit.image_id).convert("RGB"))
        )
    with pytest.raises(ValueError, match="query is empty"):
        adapter.search("  ", 3)


def test_index_search_finds_images_under_a_root_and_refuses_other_models(gallery_index, tmp_path):
    from granalign.viz.index_search import IndexImageSearch

    model, processor, paths, names, images = gallery_index
    hits = IndexImageSearch(model, processor, names, image_root=images).search(CAPTION, 2)
    assert len(hits) == 2 and (images / f"{hits[0].image_id}.png").is_file()
    with pytest.raises(FileNotFoundError, match=r"no image file 'test-\d+' for index item .*--image-root"):
        IndexImageSearch(model, processor, names)  # file names, no root: the images are not found
    with pytest.raises(FileNotFoundError, match=r"no image file '.*elsewhere/test-"):
        IndexImageSearch(model, processor, names, image_root=tmp_path / "elsewhere")
    other = tiny_model("vit", seed=7).eval()
    with pytest.raises(ValueError, match=r"this index was built by model sha256:.*rebuild the index"):
        IndexImageSearch(other, processor, paths)


def test_demo_cli_and_space_search_an_index_and_refuse_another_models(
    gallery_index, saved_vit, tokenizer, tmp_path, monkeypatch
):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'granalign[demo]')")
    from granalign.viz import demo
    from granalign.viz.index_search import IndexImageSearch

    _, _, paths, names, images = gallery_index
    served = []
    monkeypatch.setattr(demo, "launch_demo", lambda app, **kwargs: served.append(kwargs))
    built = []
    monkeypatch.setattr(demo, "build_demo", lambda *args, **kwargs: built.append(kwargs["search"]))
    args = _parser().parse_args(["demo", str(saved_vit), "--index", str(names), "--image-root", str(images)])
    assert args.func(args) == 0 and len(served) == 1
    assert isinstance(built[0], IndexImageSearch) and len(built[0].search(CAPTION, 4)) == 4
    assert (built[0].mode, built[0].shortlist) == ("two-stage", 20)
    argv = ["demo", str(saved_vit), "--index", str(paths), "--mode", "exhaustive", "--shortlist", "3"]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0 and (built[1].mode, built[1].shortlist) == ("exhaustive", 3)
    with pytest.raises(ValueError, match="--shortlist must be >= 1, got 0"):
        args = _parser().parse_args([*argv[:-1], "0"])
        args.func(args)
    with pytest.raises(ValueError, match="pass --index too"):
        args = _parser().parse_args(["demo", str(saved_vit), "--image-root", str(images)])
        args.func(args)

    other = tmp_path / "other"
    tiny_model("vit", seed=7).save_pretrained(other)
    _processor(tokenizer, (32, 32)).save_pretrained(other)
    args = _parser().parse_args(["demo", str(other), "--index", str(paths)])
    with pytest.raises(ValueError, match="this index was built by model sha256:"):
        args.func(args)
    assert len(served) == 2  # refused before serving

    spec = importlib.util.spec_from_file_location("space_app", REPO_ROOT / "spaces" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    monkeypatch.setenv(app.MODEL_VARIABLE, str(other))
    monkeypatch.setenv(app.INDEX_VARIABLE, str(paths))
    with pytest.raises(ValueError, match="this index was built by model sha256:"):
        app.create_app()


def test_space_readme_configures_a_gradio_space():
    import yaml

    text = (REPO_ROOT / "spaces" / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py"
    assert (REPO_ROOT / "spaces" / header["app_file"]).is_file()
    assert header["license"] == "apache-2.0" and header["pinned"] is False
    assert {"title", "emoji", "colorFrom", "colorTo", "sdk_version", "short_description"} <= set(header)
    assert len(header["short_description"]) <= 60
    assert Version(str(header["sdk_version"])) >= Version("6.0")  # as the demo extra requires

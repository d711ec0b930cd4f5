"""Tests for `GranAlignProcessor`: every input type and mode, padding/truncation, shapes and dtypes,
save/load round-trips (with and without an image processor, and through remote code), and every
bad-input error. Offline: a 14-word BERT vocab and a 32 px ViT image processor built in place."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import BertTokenizer

from granalign import processing_granalign
from granalign.processing_granalign import GranAlignProcessor

# Without torchvision, transformers 5 maps `ViTImageProcessor` to the PIL backend with a warning.
ViTImageProcessor = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "cat",
    "dog",
    "on",
    "the",
    "mat",
    "sits",
    "red",
    "##s",
]
PAD, CLS, SEP = 0, 2, 3
MAX_LENGTH = 12
SIZE = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizer:
    vocab_file = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=str(vocab_file))


@pytest.fixture(scope="module")
def image_processor() -> transformers.BaseImageProcessor:
    return ViTImageProcessor(size={"height": SIZE, "width": SIZE})


@pytest.fixture
def processor(image_processor, tokenizer) -> GranAlignProcessor:
    return GranAlignProcessor(image_processor=image_processor, tokenizer=tokenizer, max_length=MAX_LENGTH)


@pytest.fixture
def region_processor(tokenizer) -> GranAlignProcessor:
    return GranAlignProcessor(tokenizer=tokenizer, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A random 20x24 RGB uint8 image, [H, W, 3]."""
    return np.random.default_rng(0).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    """A random 20x24 grayscale uint8 image, [H, W]."""
    return np.random.default_rng(1).integers(0, 256, size=(20, 24), dtype=np.uint8)


def pixels(processor: GranAlignProcessor, images) -> torch.Tensor:
    return processor(images=images)["pixel_values"]


# ----------------------------------------------------------------------------------------- text


def test_single_caption_is_padded_to_max_length(processor):
    batch = processor(text="a cat sits on the mat")
    assert set(batch.keys()) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (1, MAX_LENGTH)
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    ids = batch["input_ids"][0].tolist()
    assert ids[:8] == [CLS, 5, 6, 11, 8, 9, 10, SEP]
    assert ids[8:] == [PAD] * (MAX_LENGTH - 8)
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0] * (MAX_LENGTH - 8)


def test_caption_list_and_tuple_give_the_same_batch(processor):
    as_list = processor(text=["a cat", "the red dog sits"])
    as_tuple = processor(text=("a cat", "the red dog sits"))
    assert as_list["input_ids"].shape == (2, MAX_LENGTH)
    assert torch.equal(as_list["input_ids"], as_tuple["input_ids"])


def test_padding_longest_pads_to_the_longest_caption(processor):
    batch = processor(text=["a cat", "the red dog sits"], padding="longest")
    assert batch["input_ids"].shape == (2, 6)  # [CLS] the red dog sits [SEP]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]


def test_padding_true_means_longest(processor):
    assert processor(text=["a cat", "a dog"], padding=True)["input_ids"].shape == (2, 4)


def test_long_captions_are_truncated_to_max_length(processor):
    long_caption = " ".join(["a red cat sits on the mat"] * 5)
    for padding in ("max_length", "longest"):
        batch = processor(text=[long_caption, "a cat"], padding=padding)
        assert batch["input_ids"].shape == (2, MAX_LENGTH)
        assert batch["input_ids"][0, -1].item() == SEP
        assert batch["attention_mask"][0].sum().item() == MAX_LENGTH


def test_max_length_can_be_overridden_per_call(processor):
    long_caption = " ".join(["a red cat sits on the mat"] * 5)
    assert processor(text=long_caption, max_length=6)["input_ids"].shape == (1, 6)
    assert processor(text="a cat", max_length=20)["input_ids"].shape == (1, 20)
    assert processor.max_length == MAX_LENGTH


def test_return_tensors_np(processor):
    batch = processor(text="a cat", images=np.zeros((8, 8, 3), np.uint8), return_tensors="np")
    assert isinstance(batch["input_ids"], np.ndarray) and batch["input_ids"].shape == (1, MAX_LENGTH)
    assert isinstance(batch["pixel_values"], np.ndarray) and batch["pixel_values"].shape == (1, 3, SIZE, SIZE)


def test_decode_and_batch_decode_forward_to_the_tokenizer(processor):
    ids = processor(text=["a cat sits on the mat", "red dogs"])["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["a cat sits on the mat", "red dogs"]
    assert processor.decode(ids[1], skip_special_tokens=True) == "red dogs"


def test_model_input_names_match_the_modality(processor, region_processor, rgb):
    """As transformers' processors: the keys a text + image call returns (regions for region models)."""
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]
    assert list(processor(text="a cat", images=rgb).keys()) == processor.model_input_names
    assert region_processor.model_input_names == [
        "input_ids",
        "attention_mask",
        "region_features",
        "region_mask",
    ]
    batch = region_processor(text="a cat", regions=np.ones((2, 3)))
    assert list(batch.keys()) == region_processor.model_input_names


# --------------------------------------------------------------------------------------- images


def test_text_and_images_give_the_design_keys(processor, rgb):
    batch = processor(text=["a cat", "a dog"], images=[rgb, rgb])
    assert set(batch.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: a, id="numpy-HWC-uint8"),
        pytest.param(lambda a: Image.fromarray(a), id="PIL-RGB"),
        pytest.param(lambda a: np.ascontiguousarray(a.transpose(2, 0, 1)), id="numpy-CHW-uint8"),
        pytest.param(lambda a: a.astype(np.float64), id="numpy-float-0-255"),
        pytest.param(lambda a: a.astype(np.uint16) * 257, id="numpy-uint16"),
        pytest.param(lambda a: a.astype(np.int64), id="numpy-int64"),
        pytest.param(lambda a: torch.from_numpy(a).permute(2, 0, 1).contiguous(), id="torch-CHW-uint8"),
        pytest.param(lambda a: torch.from_numpy(a), id="torch-HWC-uint8"),
        pytest.param(lambda a: np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]), id="numpy-RGBA-opaque"),
    ],
)
def test_rgb_image_types_match_the_pil_reference(processor, rgb, make):
    assert torch.equal(pixels(processor, make(rgb)), pixels(processor, Image.fromarray(rgb)))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: a.astype(np.float32) / 255.0, id="numpy-float-0-1"),
        pytest.param(lambda a: torch.from_numpy(a).permute(2, 0, 1) / 255.0, id="torch-CHW-float-0-1"),
    ],
)
def test_float_pixels_in_0_1_take_do_rescale_false(processor, rgb, make):
    """transformers' convention: the image processor rescales by 1/255 unless told they are in [0, 1]."""
    reference = pixels(processor, Image.fromarray(rgb))
    assert torch.equal(processor(images=make(rgb), do_rescale=False)["pixel_values"], reference)
    assert not torch.allclose(pixels(processor, make(rgb)), reference)  # rescaled twice


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda g: g, id="numpy-2D"),
        pytest.param(lambda g: g[:, :, None], id="numpy-HW1"),
        pytest.param(lambda g: torch.from_numpy(g)[None], id="torch-1HW"),
        pytest.param(lambda g: Image.fromarray(g.astype(np.uint16) * 257), id="PIL-I;16"),
        pytest.param(lambda g: Image.fromarray(g.astype(np.int32) * 257), id="PIL-I-16bit"),
        pytest.param(lambda g: Image.fromarray(g.astype(np.float32) / 255.0), id="PIL-F"),
        pytest.param(lambda g: np.dstack([g, np.full(g.shape, 255, np.uint8)]), id="numpy-LA-opaque"),
    ],
)
def test_grayscale_image_types_become_gray_rgb(processor, gray, make):
    reference = Image.fromarray(gray).convert("RGB")
    assert torch.equal(pixels(processor, make(gray)), pixels(processor, reference))


def test_16bit_pil_images_are_rescaled_not_clipped(processor, gray):
    """PIL's own I;16 -> RGB conversion clips at 255 (a 16-bit image would come out almost white)."""
    sixteen_bit = Image.fromarray(gray.astype(np.uint16) * 257)
    clipped = sixteen_bit.convert("RGB")
    assert not torch.equal(pixels(processor, sixteen_bit), pixels(processor, clipped))


def test_ambiguous_layouts_are_read_as_the_image_processor_reads_them(processor):
    """A [3, 5, 3] array is read channels-first (a 5x3 RGB image), numpy or torch, as transformers' image
    processors infer it; `input_data_format` says otherwise."""
    array = np.random.default_rng(5).integers(0, 256, size=(3, 5, 3), dtype=np.uint8)
    channels_first = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)))
    assert torch.equal(pixels(processor, array), pixels(processor, channels_first))
    assert torch.equal(pixels(processor, torch.from_numpy(array)), pixels(processor, channels_first))
    as_last = processor(images=array, input_data_format="channels_last")["pixel_values"]
    assert torch.equal(as_last, pixels(processor, Image.fromarray(array)))
    # layouts GRM converts (grayscale, alpha) follow the same rule
    gray = array[:1]  # [1, 5, 3]: one 5x3 channel
    assert torch.equal(pixels(processor, gray), pixels(processor, Image.fromarray(array[0]).convert("RGB")))
    rgba = np.concatenate([array, np.full((1, 5, 3), 255, np.uint8)])  # [4, 5, 3]: RGBA channels-first
    assert torch.equal(pixels(processor, rgba), pixels(processor, channels_first))
    two_d = array[0]  # [H, W] -> 3 channels, whatever input_data_format says
    expected = pixels(processor, Image.fromarray(two_d).convert("RGB"))
    for layout in ("channels_first", "channels_last"):
        assert torch.equal(processor(images=two_d, input_data_format=layout)["pixel_values"], expected)


def test_half_precision_tensors_are_accepted(processor, rgb):
    reference = pixels(processor, Image.fromarray(rgb))
    for dtype in (torch.float16, torch.bfloat16):
        tensor = (torch.from_numpy(rgb).permute(2, 0, 1) / 255.0).to(dtype)
        half = processor(images=tensor, do_rescale=False)["pixel_values"]
        torch.testing.assert_close(half, reference, atol=0.05, rtol=0)


def test_bool_images_map_to_black_and_white(processor):
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4] = True
    reference = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
    assert torch.equal(pixels(processor, mask), pixels(processor, reference))


def _white_composite(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """Reference: alpha in {0, 255} -> transparent pixels white, opaque ones unchanged."""
    return Image.fromarray(np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8))


@pytest.mark.parametrize("as_numpy", [False, True], ids=["PIL-RGBA", "numpy-HWC4"])
def test_transparent_pixels_are_composited_on_white(processor, rgb, as_numpy):
    alpha = np.where(np.random.default_rng(2).random(rgb.shape[:2]) < 0.5, 0, 255).astype(np.uint8)
    rgba = np.dstack([rgb, alpha])
    image = rgba if as_numpy else Image.fromarray(rgba)
    assert torch.equal(pixels(processor, image), pixels(processor, _white_composite(rgb, alpha)))


def test_grayscale_with_alpha_is_composited_on_white(processor, gray):
    alpha = np.where(np.arange(gray.size).reshape(gray.shape) % 3 == 0, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.dstack([gray, alpha]))
    assert image.mode == "LA"
    reference = _white_composite(np.repeat(gray[..., None], 3, axis=2), alpha)
    assert torch.equal(pixels(processor, image), pixels(processor, reference))


def test_palette_images_with_and_without_transparency(processor, rgb):
    palette = Image.fromarray(rgb).convert("P")
    assert torch.equal(pixels(processor, palette), pixels(processor, palette.convert("RGB")))
    transparent_index = palette.getpixel((0, 0))
    palette.info["transparency"] = transparent_index
    indices = np.asarray(palette)
    expected = np.where((indices == transparent_index)[..., None], 255, np.asarray(palette.convert("RGB")))
    assert torch.equal(
        pixels(processor, palette), pixels(processor, Image.fromarray(expected.astype(np.uint8)))
    )


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "1", "RGBX", "HSV"])
def test_other_pil_modes_use_pils_rgb_conversion(processor, rgb, mode):
    image = Image.fromarray(rgb).convert(mode)
    assert torch.equal(pixels(processor, image), pixels(processor, image.convert("RGB")))


def test_images_of_any_size_are_resized(processor):
    batch = processor(
        images=[Image.new("RGB", (1, 1)), np.zeros((3, 200, 3), np.uint8), Image.new("L", (77, 5))]
    )
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)


def test_batched_arrays_and_mixed_lists(processor, rgb, gray):
    stacked = np.stack([rgb, rgb[::-1]])
    from_numpy = pixels(processor, stacked)
    from_torch = pixels(processor, torch.from_numpy(stacked).permute(0, 3, 1, 2))
    from_list = pixels(processor, [Image.fromarray(rgb), rgb[::-1].copy()])
    assert from_numpy.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(from_numpy, from_torch) and torch.equal(from_numpy, from_list)
    mixed = pixels(processor, [Image.fromarray(gray), torch.from_numpy(rgb).permute(2, 0, 1), rgb])
    assert mixed.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(mixed[1], mixed[2])


def test_nested_image_lists_are_flattened(processor, rgb, gray):
    """transformers' nested layout (one list of images per sample, possibly empty) is accepted."""
    flat = pixels(processor, [rgb, gray, rgb[::-1].copy()])
    assert torch.equal(pixels(processor, [[rgb], [], [gray, rgb[::-1].copy()]]), flat)
    assert torch.equal(pixels(processor, [np.stack([rgb, np.dstack([gray] * 3)]), rgb[::-1].copy()]), flat)


def test_images_only_call_returns_only_pixels(processor, rgb):
    assert set(processor(images=rgb).keys()) == {"pixel_values"}


def test_image_paths_are_loaded_with_their_transparency(processor, rgb, tmp_path):
    alpha = np.where(np.random.default_rng(6).random(rgb.shape[:2]) < 0.5, 0, 255).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "picture.png")
    expected = pixels(processor, _white_composite(rgb, alpha))
    assert torch.equal(pixels(processor, str(tmp_path / "picture.png")), expected)
    assert torch.equal(pixels(processor, [[str(tmp_path / "picture.png")]]), expected)


# -------------------------------------------------------------------------------------- regions


def test_variable_regions_are_padded_with_a_mask(region_processor):
    rng = np.random.default_rng(3)
    first, second, third = rng.normal(size=(3, 5)), rng.normal(size=(1, 5)), rng.normal(size=(4, 5))
    batch = region_processor(
        text=["a cat", "a dog", "the mat"],
        regions=[first, torch.from_numpy(second), third.tolist()],
    )
    assert set(batch.keys()) == {"input_ids", "attention_mask", "region_features", "region_mask"}
    features, mask = batch["region_features"], batch["region_mask"]
    assert features.shape == (3, 4, 5) and features.dtype == torch.float32
    assert mask.dtype == torch.int64
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    for row, array in enumerate((first, second, third)):
        n = array.shape[0]
        assert torch.equal(features[row, :n], torch.from_numpy(array.astype(np.float32)))
        assert torch.count_nonzero(features[row, n:]) == 0


def test_single_region_array_is_a_batch_of_one(region_processor):
    features = torch.randn(6, 8, dtype=torch.float64)
    batch = region_processor(regions=features)
    assert set(batch.keys()) == {"region_features", "region_mask"}
    assert batch["region_features"].shape == (1, 6, 8) and batch["region_features"].dtype == torch.float32
    assert torch.equal(batch["region_features"][0], features.float())
    assert batch["region_mask"].tolist() == [[1] * 6]


def test_3d_region_array_is_a_batch_with_every_region_real(region_processor):
    features = np.random.default_rng(4).normal(size=(2, 3, 4)).astype(np.float32)
    batch = region_processor(regions=features)
    assert torch.equal(batch["region_features"], torch.from_numpy(features))
    assert batch["region_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]


def test_bfloat16_regions_become_float32(region_processor):
    batch = region_processor(regions=[torch.ones(2, 3, dtype=torch.bfloat16)])
    assert batch["region_features"].dtype == torch.float32


def test_region_boxes_are_padded_like_the_features(region_processor):
    boxes = [np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float64), torch.tensor([[1.0, 2.0, 3.0, 4.0]])]
    batch = region_processor(regions=[np.ones((2, 3)), np.ones((1, 3))], region_boxes=boxes)
    assert batch["region_boxes"].shape == (2, 2, 4) and batch["region_boxes"].dtype == torch.float32
    assert batch["region_boxes"][0].tolist() == [[0, 0, 10, 10], [5, 5, 20, 20]]
    assert batch["region_boxes"][1].tolist() == [[1, 2, 3, 4], [0, 0, 0, 0]]


def test_region_outputs_as_numpy(region_processor):
    batch = region_processor(regions=[np.ones((2, 3)), np.ones((1, 3))], return_tensors="np")
    assert batch["region_features"].dtype == np.float32 and batch["region_mask"].dtype == np.int64


def test_processor_with_an_image_processor_also_pads_regions(processor):
    batch = processor(text="a cat", regions=[np.ones((2, 3))])
    assert batch["region_features"].shape == (1, 2, 3)


# ------------------------------------------------------------------------------------- pairing


def test_unpaired_text_and_images_may_differ_in_number(processor, rgb):
    batch = processor(text=["a cat", "a dog", "the mat"], images=[rgb, rgb])
    assert batch["input_ids"].shape[0] == 3 and batch["pixel_values"].shape[0] == 2


def test_paired_inputs_must_match_in_number(processor, region_processor, rgb):
    assert processor(text=["a cat", "a dog"], images=[rgb, rgb], paired=True)["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match="2 captions and 3 images"):
        processor(text=["a cat", "a dog"], images=[rgb, rgb, rgb], paired=True)
    with pytest.raises(ValueError, match="1 captions and 2 region arrays"):
        region_processor(text="a cat", regions=[np.ones((1, 3)), np.ones((2, 3))], paired=True)


def test_paired_needs_both_modalities(processor):
    with pytest.raises(ValueError, match="paired=True needs both"):
        processor(text="a cat", paired=True)


# ---------------------------------------------------------------------------------- round-trips


def _outputs_equal(first, second) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_save_and_load_with_an_image_processor(processor, rgb, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = GranAlignProcessor.from_pretrained(tmp_path)
    assert loaded.max_length == MAX_LENGTH
    assert type(loaded.image_processor) is type(processor.image_processor)
    assert loaded.image_processor.size == processor.image_processor.size
    inputs = {"text": ["a cat sits", "a dog"], "images": [rgb, Image.fromarray(rgb).convert("L")]}
    _outputs_equal(processor(**inputs), loaded(**inputs))
    _outputs_equal(processor(**inputs, padding="longest"), loaded(**inputs, padding="longest"))


def test_save_and_load_without_an_image_processor(region_processor, tmp_path):
    region_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["image_processor"] is None and config["max_length"] == MAX_LENGTH
    assert "get_attributes" not in vars(region_processor)  # the save-time view is gone
    loaded = GranAlignProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor is None and loaded.max_length == MAX_LENGTH
    inputs = {"text": ["a cat", "a red dog"], "regions": [np.ones((2, 3)), np.full((3, 3), 0.5)]}
    _outputs_equal(region_processor(**inputs), loaded(**inputs))
    loaded.save_pretrained(tmp_path / "again")  # a loaded tokenizer-only processor saves again
    assert GranAlignProcessor.from_pretrained(tmp_path / "again").image_processor is None


def test_from_pretrained_kwargs_override_the_saved_max_length(region_processor, tmp_path):
    region_processor.save_pretrained(tmp_path)
    loaded = GranAlignProcessor.from_pretrained(tmp_path, max_length=7)
    assert loaded.max_length == 7 and loaded(text="a cat")["input_ids"].shape == (1, 7)
    assert loaded.tokenizer.init_kwargs.get("max_length") != 7  # the processor's setting, not the tokenizer's
    loaded.max_length = 9
    assert loaded(text="a cat")["input_ids"].shape == (1, 9)
    assert json.loads(loaded.to_json_string())["max_length"] == 9


def test_tokenizer_init_options_and_call_options_override_the_defaults(image_processor, tmp_path):
    """transformers' order: call kwargs > the tokenizer's init kwargs > this processor's defaults."""
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(vocab_file), padding="longest", max_length=5)
    processor = GranAlignProcessor(image_processor, tokenizer)
    assert processor.max_length == 5  # taken from the tokenizer when not given
    assert processor(text=["a cat", "a dog"])["input_ids"].shape == (2, 4)
    assert processor(text="a cat sits on the mat")["input_ids"].shape == (1, 5)
    assert processor(text="a cat", padding="max_length", max_length=10)["input_ids"].shape == (1, 10)
    # this processor's own max_length (given, loaded or set) wins over the tokenizer's
    processor = GranAlignProcessor(image_processor, tokenizer, max_length=7)
    assert processor(text="a cat sits on the mat red red")["input_ids"].shape == (1, 7)


def test_module_imports_only_what_a_hub_checkpoint_has():
    """The file is copied next to checkpoints and run where `granalign` is not installed."""
    tree = ast.parse(Path(processing_granalign.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 or (node.module or "").endswith("_granalign"), ast.dump(node)
            if node.level == 0:
                imported.add((node.module or "").split(".")[0])
    allowed = {
        "__future__",
        "collections",
        "os",
        "typing",
        "warnings",
        "numpy",
        "PIL",
        "torch",
        "transformers",
    }
    # granalign only lazily, in push_to_hub, which falls back to transformers' push without it
    lazy = {
        node.module.split(".")[0]
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef) and function.name == "push_to_hub"
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert lazy <= {"granalign"}, lazy
    assert imported - lazy <= allowed, imported - lazy - allowed


_REMOTE_LOAD = textwrap.dedent(
    """
    import sys

    sys.modules["granalign"] = None  # as on a machine without the package: importing it fails
    import numpy as np
    from transformers import AutoProcessor

    image_dir, region_dir, out_file = sys.argv[1:4]
    with_images = AutoProcessor.from_pretrained(image_dir, trust_remote_code=True)
    with_regions = AutoProcessor.from_pretrained(region_dir, trust_remote_code=True)
    assert "transformers_modules" in type(with_images).__module__, type(with_images).__module__
    assert with_regions.image_processor is None
    image = np.arange(20 * 24 * 3, dtype=np.uint8).reshape(20, 24, 3)
    a = with_images(text=["a cat", "a dog"], images=image, return_tensors="np")
    b = with_regions(text="a cat", regions=[np.ones((2, 3)), np.ones((1, 3))], return_tensors="np")
    np.savez(out_file, max_length=with_images.max_length, **a, **{"r_" + k: v for k, v in b.items()})
    """
)


@pytest.mark.slow
def test_remote_code_round_trip_without_the_package(processor, region_processor, tmp_path, monkeypatch):
    """`register_for_auto_class` + `AutoProcessor.from_pretrained(..., trust_remote_code=True)` in a fresh
    interpreter where `import granalign` fails, for both variants."""
    monkeypatch.setattr(GranAlignProcessor, "_auto_class", "AutoProcessor")
    processor.save_pretrained(tmp_path / "images")
    region_processor.save_pretrained(tmp_path / "regions")
    monkeypatch.undo()
    assert (tmp_path / "regions" / "processing_granalign.py").is_file()
    script, out_file = tmp_path / "load.py", tmp_path / "out.npz"
    script.write_text(_REMOTE_LOAD, encoding="utf-8")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(script), str(tmp_path / "images"), str(tmp_path / "regions"), str(out_file)]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    remote = np.load(out_file)
    assert int(remote["max_length"]) == MAX_LENGTH
    image = np.arange(20 * 24 * 3, dtype=np.uint8).reshape(20, 24, 3)
    local = processor(text=["a cat", "a dog"], images=image, return_tensors="np")
    local_regions = region_processor(
        text="a cat", regions=[np.ones((2, 3)), np.ones((1, 3))], return_tensors="np"
    )
    for key, value in local.items():
        np.testing.assert_array_equal(remote[key], value)
    for key, value in local_regions.items():
        np.testing.assert_array_equal(remote["r_" + key], value)


# ------------------------------------------------------------------------------------ bad input


def test_nothing_to_process(processor):
    with pytest.raises(ValueError, match="Nothing to process"):
        processor()


def test_empty_or_whitespace_caption_names_its_index(processor):
    with pytest.raises(ValueError, match=r"text\[2\] is empty or whitespace-only"):
        processor(text=["a cat", "a dog", " \t\n"])
    with pytest.raises(ValueError, match=r"text\[0\] is empty"):
        processor(text="")


def test_empty_caption_list(processor):
    with pytest.raises(ValueError, match="`text` is an empty list"):
        processor(text=[])


def test_non_string_caption(processor):
    with pytest.raises(TypeError, match=r"text\[1\] is a int"):
        processor(text=["a cat", 3])
    with pytest.raises(TypeError, match="`text` must be a string or a list of strings"):
        processor(text=42)


def test_zero_sized_images_name_index_and_size(processor, rgb):
    with pytest.raises(ValueError, match=r"image 1 is empty: size 0x5 \(width x height\)"):
        processor(images=[rgb, Image.new("RGB", (0, 5))])
    with pytest.raises(ValueError, match=r"image 0 is empty: shape \(0, 4, 3\)"):
        processor(images=np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image 1 is empty: shape \(3, 0, 4\)"):
        processor(images=[rgb, torch.zeros(3, 0, 4)])


def test_images_with_no_channel_dimension(processor):
    with pytest.raises(ValueError, match=r"image 0 has shape \(5, 6, 7\); a 3-D image needs 1, 2, 3 or 4"):
        processor(images=np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(ValueError, match=r"image 0 has shape \(1, 1, 4, 4, 3\); expected \[H, W\]"):
        processor(images=np.zeros((1, 1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image 1 has shape \(1, 4, 4, 4, 4\); expected \[H, W\]"):
        processor(images=[np.zeros((4, 4, 3), np.uint8), [np.zeros((1, 4, 4, 4, 4), np.uint8)]])
    with pytest.raises(ValueError, match=r"image 0 has shape \(3, 4, 5\) and 5 channels with input_data_"):
        processor(images=np.zeros((3, 4, 5), np.uint8), input_data_format="channels_last")


def test_normalised_or_out_of_range_pixels(processor):
    with pytest.raises(ValueError, match=r"image 0 has float values in \[-1, 1\]; expected raw pixels"):
        processor(images=np.linspace(-1, 1, 48, dtype=np.float32).reshape(4, 4, 3))
    with pytest.raises(ValueError, match=r"image 0 has float values in \[0, 300\]"):
        processor(images=np.linspace(0, 300, 48, dtype=np.float32).reshape(4, 4, 3))
    with pytest.raises(ValueError, match="image 0 contains NaN"):
        processor(images=np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"image 0 has integer values in \[-5, 0\]"):
        processor(images=np.full((4, 4), -5, np.int32) * np.eye(4, dtype=np.int32))
    with pytest.raises(ValueError, match=r"image 0 has integer values in \[0, 70000\]"):
        processor(images=np.full((4, 4), 70000, np.int64) * np.eye(4, dtype=np.int64))


def test_unsupported_image_types(processor):
    # strings are paths, URLs or base64, as for every transformers processor
    with pytest.raises(
        ValueError, match=r"Incorrect image source.*a valid path to an image file.*Got cat\.png"
    ):
        processor(images=[np.zeros((4, 4, 3), np.uint8), "cat.png"])
    with pytest.raises(TypeError, match="image 1 is a int; expected a PIL image, a numpy array"):
        processor(images=[np.zeros((4, 4, 3), np.uint8), 7])
    with pytest.raises(TypeError, match="image 0 is a dict"):
        processor(images={"image": np.zeros((4, 4, 3), np.uint8)})
    with pytest.raises(TypeError, match="image 0 has dtype complex64"):
        processor(images=np.zeros((4, 4, 3), np.complex64))
    with pytest.raises(ValueError, match="`images` is an empty list"):
        processor(images=[])
    with pytest.raises(ValueError, match="`images` is an empty list"):
        processor(images=[[], []])


def test_images_for_a_processor_without_an_image_processor(region_processor, rgb):
    with pytest.raises(ValueError, match=r"no image processor.*precomputed region features.*regions="):
        region_processor(text="a cat", images=rgb)


def test_images_and_regions_together(processor, rgb):
    with pytest.raises(ValueError, match=r"either `images`.*or `regions`"):
        processor(images=rgb, regions=np.ones((2, 3)))


def test_region_array_of_the_wrong_dimension(region_processor):
    with pytest.raises(ValueError, match=r"regions\[1\] has shape \(5,\); expected a 2-D array \[N, D\]"):
        region_processor(regions=[np.ones((2, 5)), np.ones(5)])
    with pytest.raises(ValueError, match=r"regions\[0\] has shape \(1, 2, 5\); expected a 2-D array"):
        region_processor(regions=[torch.ones(1, 2, 5)])
    with pytest.raises(ValueError, match=r"`regions` has shape \(2, 2, 2, 5\); expected \[N, D\]"):
        region_processor(regions=np.ones((2, 2, 2, 5)))
    with pytest.raises(ValueError, match=r"`regions` has shape \(5,\)"):
        region_processor(regions=np.ones(5))


def test_regions_with_differing_feature_sizes(region_processor):
    with pytest.raises(ValueError, match=r"share the feature size D; got \[4, 5\].*regions\[1\]: D=4"):
        region_processor(regions=[np.ones((2, 5)), np.ones((2, 4))])


def test_regions_that_are_empty_or_not_finite(region_processor):
    with pytest.raises(ValueError, match=r"regions\[1\] has shape \(0, 5\); every image needs at least one"):
        region_processor(regions=[np.ones((2, 5)), np.ones((0, 5))])
    with pytest.raises(ValueError, match=r"regions\[0\] contains NaN"):
        region_processor(regions=[np.full((2, 5), np.inf)])
    with pytest.raises(ValueError, match="`regions` is an empty list"):
        region_processor(regions=[])


def test_regions_of_the_wrong_type(region_processor):
    with pytest.raises(ValueError, match=r"regions\[0\] is not a rectangular numeric array"):
        region_processor(regions=[[[1.0, 2.0], [3.0]]])
    with pytest.raises(TypeError, match=r"regions\[0\] is a str"):
        region_processor(regions=["features.npy"])
    with pytest.raises(TypeError, match="`regions` must be a numpy array"):
        region_processor(regions="features.npy")
    with pytest.raises(TypeError, match="regions` has dtype <U1"):
        region_processor(regions=np.array([["a", "b"]]))


def test_complex_regions_are_an_error_not_their_real_part(region_processor):
    with pytest.raises(TypeError, match=r"regions\[0\] has dtype complex64; expected a real numeric array"):
        region_processor(regions=[np.ones((2, 3), np.complex64)])
    with pytest.raises(
        TypeError, match=r"`regions` has dtype torch.complex64; expected a real numeric tensor"
    ):
        region_processor(regions=torch.ones(2, 3, dtype=torch.complex64))


def test_region_and_box_counts_that_differ(region_processor):
    regions = [np.ones((2, 3)), np.ones((3, 3))]
    with pytest.raises(ValueError, match=r"region_boxes\[1\] has 2 boxes but regions\[1\] has 3 regions"):
        region_processor(regions=regions, region_boxes=[np.ones((2, 4)), np.ones((2, 4))])
    with pytest.raises(ValueError, match="Got 1 region_boxes arrays for 2 region arrays"):
        region_processor(regions=regions, region_boxes=[np.ones((2, 4))])
    with pytest.raises(ValueError, match=r"region_boxes\[0\] has shape \(2, 5\); expected \[N, 4\]"):
        region_processor(regions=regions, region_boxes=[np.ones((2, 5)), np.ones((3, 4))])


def test_boxes_without_regions(region_processor):
    with pytest.raises(ValueError, match="`region_boxes` was given without `regions`"):
        region_processor(text="a cat", region_boxes=[np.ones((2, 4))])


def test_bad_call_options(processor):
    with pytest.raises(ValueError, match="padding must be True, False or one of"):
        processor(text="a cat", padding="max")
    with pytest.raises(ValueError, match="tf is not a valid TensorType, please select one of"):
        processor(text="a cat", return_tensors="tf")
    with pytest.raises(ValueError, match="tf is not a valid TensorType"):
        processor(regions=np.ones((2, 3)), return_tensors="tf")
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        processor(text="a cat", max_length=0)
    with pytest.raises(ValueError, match="max_length must be a positive integer, got -3"):
        processor(text="a cat", text_kwargs={"max_length": -3})
    with pytest.raises(ValueError, match="padding must be True, False or one of"):
        processor(text="a cat", text_kwargs={"padding": None})
    with pytest.raises(ValueError, match="Keyword argument padding was passed two times"):
        processor(text="a cat", padding="longest", text_kwargs={"padding": "max_length"})
    with pytest.raises(Exception, match="Field 'paired' expected bool, got str"):
        processor(text="a cat", paired="yes")


def test_unknown_options_are_ignored_with_a_warning(processor, caplog):
    """transformers' convention (`_merge_kwargs`): an option no sub-processor takes is logged, not raised."""
    transformers.logging.enable_propagation()
    try:
        batch = processor(text="a cat", colour_space="hsv")
    finally:
        transformers.logging.disable_propagation()
    assert batch["input_ids"].shape == (1, MAX_LENGTH)
    assert "`colour_space` is not a valid argument" in caplog.text


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_typed_options_reach_the_sub_processors(processor, rgb, nested):
    text_options, image_options = {"add_special_tokens": False}, {"do_normalize": False, "do_resize": False}
    if nested:
        batch = processor(text="a cat", images=rgb, text_kwargs=text_options, images_kwargs=image_options)
    else:
        batch = processor(text="a cat", images=rgb, **text_options, **image_options)
    assert batch["input_ids"][0, :2].tolist() == [5, 6]
    assert batch["pixel_values"].shape == (1, 3, 20, 24)  # not resized
    assert batch["pixel_values"].min() >= 0  # not normalised to [-1, 1]
    rescaled = processor(images=rgb, do_rescale=False, do_normalize=False, do_resize=False)["pixel_values"]
    assert torch.equal(rescaled[0], torch.from_numpy(rgb).permute(2, 0, 1).float())
    sized = processor(images=rgb, size={"height": 8, "width": 16})["pixel_values"]
    assert sized.shape == (1, 3, 8, 16)


def test_the_calls_sentence_transformers_makes(processor, region_processor, rgb):
    """Per-modality dicts for every modality, as `sentence_transformers.models.Transformer` passes them."""
    options = {
        "text_kwargs": {"padding": True, "truncation": "longest_first"},
        "images_kwargs": {},
        "audio_kwargs": {"padding": True},
        "videos_kwargs": {},
        "common_kwargs": {"return_tensors": "pt"},
    }
    texts = processor(text=["a cat", "the red dog sits"], **options)
    assert texts["input_ids"].shape == (2, 6) and set(texts) == {"input_ids", "attention_mask"}
    assert processor(images=[rgb], **options)["pixel_values"].shape == (1, 3, SIZE, SIZE)
    assert region_processor(text="a cat", **options)["input_ids"].shape == (1, 4)


def test_bad_constructor_arguments(image_processor, tokenizer):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        GranAlignProcessor(image_processor=image_processor)
    with pytest.raises(ValueError, match="max_length must be a positive integer, got True"):
        GranAlignProcessor(tokenizer=tokenizer, max_length=True)
    with pytest.raises(TypeError, match="Unexpected keyword argument max_len"):
        GranAlignProcessor(tokenizer=tokenizer, max_len=8)
    with pytest.raises(TypeError, match="image_processor"):
        GranAlignProcessor(image_processor=tokenizer, tokenizer=tokenizer)  # type checks still apply


def test_max_length_beyond_the_text_tower(image_processor, tmp_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    short = BertTokenizer(vocab=str(vocab_file), model_max_length=16)
    with pytest.raises(ValueError, match="max_length=32 exceeds the tokenizer's model_max_length=16"):
        GranAlignProcessor(image_processor, short, max_length=32)
    assert GranAlignProcessor(image_processor, short).max_length == 16  # the default 32, capped
    with pytest.raises(ValueError, match="max_length=20 exceeds"):
        GranAlignProcessor(image_processor, short, max_length=8)(text="a cat", max_length=20)

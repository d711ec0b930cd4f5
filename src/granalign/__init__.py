"""granalign: GRM fine-grained image-text alignment as a Hugging Face Transformers model.

Importing the package registers `GranAlignConfig`, `GranAlignModel` and `GranAlignProcessor` with the
`AutoConfig`, `AutoModel` and `AutoProcessor` factories (`granalign.auto_registration`: at once when
transformers' Auto classes are already imported, else as they are first imported). The package itself
imports neither torch nor transformers: the classes below are imported on first access, so the
`granalign` command line starts quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import auto_registration
from .auto_registration import register_auto_classes

if TYPE_CHECKING:  # the lazy names, for type checkers and editors
    from .configuration_granalign import GranAlignConfig
    from .modeling_granalign import GranAlignModel, GranAlignPreTrainedModel
    from .outputs_granalign import (
        GranAlignImageOutput,
        GranAlignLoss,
        GranAlignOutput,
        GranAlignTextOutput,
        concat_image_outputs,
        concat_text_outputs,
    )
    from .processing_granalign import GranAlignProcessor

__version__ = "0.1.0"

_LAZY = {
    "GranAlignConfig": "configuration_granalign",
    "GranAlignModel": "modeling_granalign",
    "GranAlignPreTrainedModel": "modeling_granalign",
    "GranAlignProcessor": "processing_granalign",
    "GranAlignImageOutput": "outputs_granalign",
    "GranAlignLoss": "outputs_granalign",
    "GranAlignOutput": "outputs_granalign",
    "GranAlignTextOutput": "outputs_granalign",
    "concat_image_outputs": "outputs_granalign",
    "concat_text_outputs": "outputs_granalign",
}

__all__ = [
    "GranAlignConfig",
    "GranAlignImageOutput",
    "GranAlignLoss",
    "GranAlignModel",
    "GranAlignOutput",
    "GranAlignPreTrainedModel",
    "GranAlignProcessor",
    "GranAlignTextOutput",
    "concat_image_outputs",
    "concat_text_outputs",
    "register_auto_classes",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'granalign' has no attribute {name!r}")
    register_auto_classes()  # a class in hand means torch is imported anyway
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


auto_registration.install()

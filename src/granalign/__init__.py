"""granalign: GRM fine-grained image-text alignment as a Hugging Face Transformers model.

Importing the package registers `GranAlignConfig`, `GranAlignModel` and `GranAlignProcessor` with the
`AutoConfig`, `AutoModel` and `AutoProcessor` factories.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

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

AutoConfig.register(GranAlignConfig.model_type, GranAlignConfig, exist_ok=True)
AutoModel.register(GranAlignConfig, GranAlignModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(GranAlignConfig, GranAlignModel, exist_ok=True)
AutoProcessor.register(GranAlignConfig, GranAlignProcessor, exist_ok=True)

# Saved checkpoints carry their code and `auto_map`, so they load with `trust_remote_code=True` where this
# package is not installed.
GranAlignConfig.register_for_auto_class()
GranAlignModel.register_for_auto_class("AutoModel")
GranAlignProcessor.register_for_auto_class("AutoProcessor")

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
]

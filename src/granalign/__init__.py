"""granalign: GRM fine-grained image-text alignment as a Hugging Face Transformers model.

Importing the package registers `GranAlignConfig`, `GranAlignModel` and `GranAlignProcessor` with the
`AutoConfig`, `AutoModel` and `AutoProcessor` factories.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

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

__version__ = "0.1.0"

AutoConfig.register(GranAlignConfig.model_type, GranAlignConfig, exist_ok=True)
AutoModel.register(GranAlignConfig, GranAlignModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(GranAlignConfig, GranAlignModel, exist_ok=True)

__all__ = [
    "GranAlignConfig",
    "GranAlignImageOutput",
    "GranAlignLoss",
    "GranAlignModel",
    "GranAlignOutput",
    "GranAlignPreTrainedModel",
    "GranAlignTextOutput",
    "concat_image_outputs",
    "concat_text_outputs",
]

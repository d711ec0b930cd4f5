"""EfficientNet-Lite (the TF-Lite EfficientNets: no squeeze-excitation, ReLU6) as a Transformers model.

    pixels [B, 3, H, W] → stem 3x3/2 conv (32 channels) → MBConv blocks (7 stages) → 1x1 head conv (1280)
    → last_hidden_state [B, 1280, H/32, W/32] → global average → pooler_output [B, 1280] → (dropout, Linear)

Every conv is followed by BatchNorm and (except the blocks' linear 1x1 projections) ReLU6. Convolutions pad
as TensorFlow's "SAME" for the actual input size (strided convs put the odd row/column at the bottom/right),
so an ImageNet checkpoint ported from TF computes the TF function at any resolution. Lite scales only the
stage widths and the repeats of the inner stages: the stem, the head and the first and last stages' repeats
stay fixed. Importing this module registers the classes with `AutoConfig`, `AutoModel` and
`AutoModelForImageClassification` (model type "efficientnet_lite"). It travels to the Hub with GRM
checkpoints (`trust_remote_code`), so it imports only torch and transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig
try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init
try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - transformers < 4.52: no gradient checkpointing
    GradientCheckpointingLayer = nn.Module

__all__ = [
    "EfficientNetLiteConfig",
    "EfficientNetLiteForImageClassification",
    "EfficientNetLiteModel",
    "EfficientNetLitePreTrainedModel",
]


class EfficientNetLiteConfig(PreTrainedConfig):
    r"""Configuration of an EfficientNet-Lite; the defaults build Lite0 (ImageNet, 224 px).

    Args:
        width_coefficient (`float`, defaults to 1.0): stage width multiplier (rounded to `depth_divisor`).
        depth_coefficient (`float`, defaults to 1.0): repeat multiplier (ceil) of all but the first and last stage.
        image_size (`int`, defaults to 224): the training resolution (padding adapts to any input size).
        num_channels (`int`, defaults to 3): input channels.
        hidden_size (`int`, defaults to 1280): channels of the head conv, i.e. of `last_hidden_state`; not scaled.
        kernel_sizes, num_block_repeats, in_channels, out_channels, expand_ratios, strides (`list[int]`): the
            stage table (EfficientNet-B0's). `in_channels[0]` is the stem width (not scaled); the other stages
            take the previous stage's output.
        depth_divisor (`int`, defaults to 8): channel counts are multiples of it.
        batch_norm_eps (`float`, defaults to 1e-3), batch_norm_momentum (`float`, defaults to 0.01): BatchNorm,
            momentum in PyTorch's convention (TF's 0.99 decay is 0.01 here).
        dropout_rate (`float`, defaults to 0.2): dropout before the classifier.
        drop_connect_rate (`float`, defaults to 0.2): stochastic depth of the residual blocks in training,
            growing linearly from 0 at the first block.
        num_labels (`int`): classifier outputs, via `PreTrainedConfig` kwargs (or `id2label`).
    """

    model_type = "efficientnet_lite"

    def __init__(
        self,
        width_coefficient: float = 1.0,
        depth_coefficient: float = 1.0,
        image_size: int = 224,
        num_channels: int = 3,
        hidden_size: int = 1280,
        kernel_sizes: Sequence[int] = (3, 3, 5, 3, 5, 5, 3),
        num_block_repeats: Sequence[int] = (1, 2, 2, 3, 3, 4, 1),
        in_channels: Sequence[int] = (32, 16, 24, 40, 80, 112, 192),
        out_channels: Sequence[int] = (16, 24, 40, 80, 112, 192, 320),
        expand_ratios: Sequence[int] = (1, 6, 6, 6, 6, 6, 6),
        strides: Sequence[int] = (1, 2, 2, 2, 1, 2, 1),
        depth_divisor: int = 8,
        batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 0.01,
        dropout_rate: float = 0.2,
        drop_connect_rate: float = 0.2,
        **kwargs,
    ) -> None:
        table = [kernel_sizes, num_block_repeats, in_channels, out_channels, expand_ratios, strides]
        if len({len(column) for column in table}) != 1:
            raise ValueError("kernel_sizes ... strides must all have one entry per stage")
        if list(in_channels[1:]) != list(out_channels[:-1]):
            raise ValueError(
                f"in_channels[1:] {in_channels[1:]} must be out_channels[:-1] {out_channels[:-1]}"
            )
        self.width_coefficient = width_coefficient
        self.depth_coefficient = depth_coefficient
        self.image_size = image_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.kernel_sizes, self.num_block_repeats, self.in_channels = map(list, table[:3])
        self.out_channels, self.expand_ratios, self.strides = map(list, table[3:])
        self.depth_divisor = depth_divisor
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        self.dropout_rate = dropout_rate
        self.drop_connect_rate = drop_connect_rate
        super().__init__(**kwargs)

    def round_channels(self, channels: int) -> int:
        """TF EfficientNet's width scaling: `channels * width` to a multiple of `depth_divisor`, ≥ 90%."""
        divisor, scaled = self.depth_divisor, channels * self.width_coefficient
        rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        return int(rounded + divisor if rounded < 0.9 * scaled else rounded)

    def stage_repeats(self) -> list[int]:
        """Blocks per stage: `ceil(repeats * depth)`, except the first and last stage (Lite keeps them)."""
        last = len(self.num_block_repeats) - 1
        return [
            r if i in (0, last) else math.ceil(r * self.depth_coefficient)
            for i, r in enumerate(self.num_block_repeats)
        ]


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one dimension: output ceil(size / stride), the odd pixel after (bottom/right)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class EfficientNetLiteConv2d(nn.Conv2d):
    """Bias-free conv with TF "SAME" padding: static for stride 1 and an odd kernel, else per input size."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int
    ) -> None:
        static = stride == 1 and kernel_size % 2 == 1
        padding = (kernel_size - 1) // 2 if static else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.dynamic_padding = not static

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, C_in, H, W]` → `[B, C_out, ceil(H / stride), ceil(W / stride)]`."""
        if self.dynamic_padding:
            height, width = hidden_states.shape[-2:]
            top, bottom = _same_padding(height, self.kernel_size[0], self.stride[0])
            left, right = _same_padding(width, self.kernel_size[1], self.stride[1])
            hidden_states = F.pad(hidden_states, (left, right, top, bottom))
        return super().forward(hidden_states)


class EfficientNetLiteConvLayer(nn.Module):
    """`conv` (TF "SAME") → `bn` → ReLU6 (left out for the blocks' linear projections)."""

    def __init__(self, config, in_channels, out_channels, kernel_size=1, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = EfficientNetLiteConv2d(in_channels, out_channels, kernel_size, stride, groups)
        self.bn = nn.BatchNorm2d(out_channels, config.batch_norm_eps, config.batch_norm_momentum)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(hidden_states)))


class EfficientNetLiteBlock(GradientCheckpointingLayer):
    """MBConv without squeeze-excitation: [1x1 `expand` →] kxk `depthwise` → linear 1x1 `project`, plus the
    input (with stochastic depth) when the shape is kept. `[B, C_in, H, W]` → `[B, C_out, H/s, W/s]`."""

    def __init__(self, config, in_channels, out_channels, kernel_size, stride, expand_ratio, drop_rate):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = EfficientNetLiteConvLayer(config, in_channels, hidden) if expand_ratio != 1 else None
        self.depthwise = EfficientNetLiteConvLayer(config, hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = EfficientNetLiteConvLayer(config, hidden, out_channels, act=False)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_rate = drop_rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = hidden_states if self.expand is None else self.expand(hidden_states)
        output = self.project(self.depthwise(output))
        if not self.residual:
            return output
        if self.training and self.drop_rate > 0:  # drop the residual branch of whole samples
            keep = output.new_empty(output.shape[0], 1, 1, 1).bernoulli_(1 - self.drop_rate)
            output = output * keep / (1 - self.drop_rate)
        return output + hidden_states


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    """TF EfficientNet's initialisation: convs N(0, 2 / fan_out), dense U(±1/√out), BatchNorm identity."""

    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            fan_out = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.out_features)
            init.uniform_(module.weight, a=-bound, b=bound)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    """The backbone: `stem`, the flat list of `blocks`, the `head` conv; no classifier."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        channels = config.in_channels[0]
        self.stem = EfficientNetLiteConvLayer(config, config.num_channels, channels, 3, 2)
        table = (config.out_channels, config.kernel_sizes, config.strides, config.expand_ratios)
        stages = zip(config.stage_repeats(), *table, strict=True)
        # one entry per block: (out channels, kernel, stride (the stage's first block only), expansion)
        plan = [(out, k, s if i == 0 else 1, e) for n, out, k, s, e in stages for i in range(n)]
        blocks = []
        for index, (out, kernel, stride, expand) in enumerate(plan):
            out = config.round_channels(out)
            drop = config.drop_connect_rate * index / len(plan)
            blocks.append(EfficientNetLiteBlock(config, channels, out, kernel, stride, expand, drop))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.head = EfficientNetLiteConvLayer(config, channels, config.hidden_size)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        """pixel_values `[B, 3, H, W]` → `last_hidden_state` `[B, hidden_size, ⌈H/32⌉, ⌈W/32⌉]` (after the
        head conv, BN and ReLU6), `pooler_output` `[B, hidden_size]` (its mean) and, with
        `output_hidden_states`, the stem's and every block's output."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states = self.stem(pixel_values)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.blocks:
            hidden_states = block(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.head(hidden_states)
        pooled = F.adaptive_avg_pool2d(hidden_states, 1).flatten(1)
        if not return_dict:
            return tuple(v for v in (hidden_states, pooled, all_hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden_states, pooler_output=pooled, hidden_states=all_hidden_states
        )


class EfficientNetLiteForImageClassification(EfficientNetLitePreTrainedModel):
    """The backbone's pooled output → dropout → `classifier` Linear(hidden_size, num_labels)."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.efficientnet_lite = EfficientNetLiteModel(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        """pixel_values `[B, 3, H, W]` (labels `[B]`) → `logits` `[B, num_labels]` (and `loss`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.efficientnet_lite(pixel_values, output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        if not return_dict:
            output = tuple(v for v in (logits, outputs.hidden_states) if v is not None)
            return output if loss is None else (loss, *output)
        return ImageClassifierOutputWithNoAttention(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states
        )


# Also when a remote-code copy of this file is imported (configuration_granalign imports it).
AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)
AutoModelForImageClassification.register(
    EfficientNetLiteConfig, EfficientNetLiteForImageClassification, exist_ok=True
)

"""GRM as a Transformers model: towers, projections, the GRM modules, scoring and the losses.

Data flow (B batch, L tokens, K regions, d = `config.embed_dim`):

    image → vision tower (or precomputed regions) → Linear → V [B, L_v, d] → significance adapter → A_V
    caption → text tower → Linear → T [B, L_t, d] → granularity adapter → A_T
    V̂ = V ⊙ A_V → region prompting → Â [B, L_v, K], μ [B, K, d] → φ → log σ², U [B, K, d]
    score = a·sim(T, V) + b·sim(T̂, V̂) + c·sim(T̂, U)

The image branch never sees the caption, so galleries are encoded once (`encode_image`, `encode_text`)
and only `score` is pairwise. This module and its `*_granalign.py` siblings travel to the Hub with a
checkpoint (`trust_remote_code`), so they import only torch and transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_granalign import GranAlignConfig
from .layers_granalign import RegionPrompting, RegionUncertainty, TokenAdapter
from .losses_granalign import (
    hinge_triplet_loss,
    infonce_loss,
    keep_ratio_loss,
    kl_to_standard_normal,
    positive_pair_mask,
    prompt_usage_negative_entropy,
    semantic_consistency_loss,
)
from .outputs_granalign import (
    GranAlignImageOutput,
    GranAlignLoss,
    GranAlignOutput,
    GranAlignTextOutput,
    concat_image_outputs,
    concat_text_outputs,
)
from .scoring_granalign import (
    chunked_level_similarities,
    code_images,
    code_texts,
    combine_levels,
    global_similarities,
)

__all__ = [
    "GranAlignModel",
    "GranAlignPreTrainedModel",
    "concat_image_outputs",
    "concat_text_outputs",
]

LEVEL_NAMES = ("original", "key", "uncertainty")
logger = logging.get_logger(__name__)


def _require(condition: torch.Tensor, message: str) -> None:
    """Raise `ValueError(message)` unless the boolean scalar tensor `condition` is true.

    Under `torch.compile` it is an asynchronous assert in the graph (no graph break; a RuntimeError)."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


def _check_mask(mask: torch.Tensor, shape: torch.Size, name: str, rows: str) -> None:
    """A `[B, L]` 0/1 mask of the inputs' shape with at least one 1 per row (not weights, not all padding)."""
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)} (the inputs' [B, L]), got {list(mask.shape)}")
    _require(((mask == 0) | (mask == 1)).all(), f"{name} must hold only 0 and 1, got other values")
    _require((mask.sum(1) > 0).all(), f"every {rows}: a row of {name} is all zeros")


def _check_finite(values: torch.Tensor, name: str) -> None:
    _require(torch.isfinite(values).all(), f"{name} holds NaN or infinite values (padding included)")


_LOSS_TEXT_CHUNK = 32  # captions per chunk when the loss scores a batch


# Layers that act only on a tower's pooled output (GRM uses the token outputs), per model type.
# (Older transformers nest CLIP/SigLIP towers one level deeper, under `vision_model`.)
_POOLED_ONLY_LAYERS: dict[str, tuple[str, ...]] = {
    "clip_vision_model": ("post_layernorm", "vision_model.post_layernorm"),
    "siglip_vision_model": ("head", "vision_model.head"),
    "convnext": ("layernorm",),
    "convnextv2": ("layernorm",),
    # timm backbones (TimmWrapper, with `do_pooling` off): what only timm's `forward_head` runs, i.e. the
    # pooled-feature norm / pre-logits MLP of ConvNeXt/MaxViT-style heads, ViT `fc_norm` and `attn_pool`.
    "timm_wrapper": (
        "timm_model.head.norm",
        "timm_model.head.pre_logits",
        "timm_model.fc_norm",
        "timm_model.attn_pool",
    ),
}


def _check_pixels(pixel_values: torch.Tensor | None) -> None:
    """Refuse missing, non-4D or non-finite pixel_values with a message naming what was expected."""
    if pixel_values is None:
        raise ValueError("this model has a vision tower: pass pixel_values [B, 3, H, W], not region_features")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B, C, H, W], got {list(pixel_values.shape)}")
    _check_finite(pixel_values, "pixel_values")


def _drop_pooling_head(tower: nn.Module) -> nn.Module:
    """Remove the layers a tower applies only to its pooled output.

    GRM consumes token outputs, and weights that never receive a gradient break DDP and waste memory.
    Masked-image-modelling tokens (ViT/DINOv2 `mask_token`) stay, for checkpoint compatibility, but frozen.
    """
    for name, parameter in tower.named_parameters():
        if name.rpartition(".")[2] == "mask_token":
            parameter.requires_grad_(False)
    if isinstance(getattr(tower, "pooler", None), nn.Module) and any(True for _ in tower.pooler.parameters()):
        tower.pooler = None
    if tower.config.model_type == "timm_wrapper":
        # TimmWrapperModel runs timm's `forward_head` (global pooling) for `pooler_output` unless told not to
        tower.config.do_pooling = False
    for path in _POOLED_ONLY_LAYERS.get(tower.config.model_type, ()):
        parent_path, _, name = path.rpartition(".")
        parent = tower
        for part in parent_path.split(".") if parent_path else ():
            parent = getattr(parent, part, None)
        if isinstance(getattr(parent, name, None), nn.Module):
            setattr(parent, name, nn.Identity())
    return tower


def _pop_prefixed(kwargs: dict, prefix: str) -> dict:
    """Remove and return the entries of `kwargs` whose key starts with `prefix`, without the prefix."""
    return {key.removeprefix(prefix): kwargs.pop(key) for key in list(kwargs) if key.startswith(prefix)}


def _keep_weights(
    adapter: TokenAdapter | None, tokens: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """An adapter's keep probabilities `[B, L]`, or the plain token mask when the adapter is switched off."""
    if adapter is None:
        return token_mask.float()
    return adapter(tokens, token_mask)


def _granalign_hub():
    """`granalign.hub.pretrained` (pushes with the GranAlign model card), or None where `granalign` is not
    installed, as when this file was loaded from the Hub with `trust_remote_code`."""
    try:
        from granalign.hub import pretrained
    except ImportError as err:
        if (getattr(err, "name", None) or "granalign").split(".")[0] != "granalign":
            raise  # granalign is there but broken: say so rather than push a different card
        logger.info("granalign is not installed: pushing with transformers' push_to_hub and model card")
        return None
    return pretrained


def _masked_unit_mean(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Unit global embedding `[B, d]`: weighted mean of unit tokens `[B, L, d]` with weights `[B, L]`."""
    weights = weights.to(tokens.dtype).unsqueeze(-1)
    mean = (F.normalize(tokens, dim=-1) * weights).sum(1) / weights.sum(1).clamp_min(1e-6)
    return F.normalize(mean, dim=-1)


class GranAlignPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the Transformers plumbing shared by GRM models."""

    config_class = GranAlignConfig
    base_model_prefix = "granalign"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The GRM parts are small; transformers adds the towers' own `_no_split_modules` to these.
    _no_split_modules = ("TokenAdapter", "RegionPrompting", "RegionUncertainty")
    # Attention runs only inside the towers, so each backend is available where the towers support it
    # (transformers checks the sub-models when one is requested).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual; a model registered for remote code also maps the zero-shot pipeline's auto class.
        With `push_to_hub=True` and `granalign` installed, the saved directory is then pushed as
        `granalign push` does, with the GranAlign model card (`granalign.hub.pretrained`)."""
        if getattr(self, "_auto_class", None) is not None:
            module = self.__class__.__module__.rpartition(".")[2]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModelForZeroShotImageClassification"] = f"{module}.{self.__class__.__name__}"
            self.config.auto_map = auto_map
        # positional args: is_main_process, state_dict, push_to_hub, ...
        if kwargs.get("push_to_hub") or (len(args) > 2 and args[2]):
            hub = _granalign_hub()
            if hub is not None:
                return hub.save_and_push_model(self, super().save_pretrained, save_directory, *args, **kwargs)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the model to the Hub (transformers' `push_to_hub` arguments). With `granalign` installed
        the commit is the one `granalign push` makes, with the GranAlign model card (license, pipeline
        tag, usage snippet; `granalign.hub.pretrained.push_model_to_hub`); without it, transformers' own."""
        hub = _granalign_hub()
        if hub is None:
            return super().push_to_hub(repo_id, **kwargs)
        return hub.push_model_to_hub(self, repo_id, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, GranAlignModel):
            module.logit_scale.fill_(math.log(1.0 / self.config.infonce_temperature))
        elif isinstance(module, RegionPrompting):
            nn.init.normal_(module.prompts, mean=0.0, std=1.0)
            nn.init.constant_(module.logit_scale, self.config.region_prompt_scale_init)
            nn.init.constant_(module.logit_bias, self.config.region_prompt_bias_init)


class GranAlignModel(GranAlignPreTrainedModel):
    r"""GRM: granularity-aware and region-uncertain fine-grained image-text alignment.

    Example:
    ```python
    >>> import torch
    >>> from granalign import GranAlignConfig, GranAlignModel
    >>> config = GranAlignConfig(
    ...     region_feature_dim=16, embed_dim=32, num_regions=3,
    ...     text_config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
    ...                  "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 50})
    >>> model = GranAlignModel(config).eval()
    >>> images = model.encode_image(region_features=torch.randn(4, 6, 16))
    >>> texts = model.encode_text(torch.randint(5, 50, (8, 7)))
    >>> model.score(images, texts).shape
    torch.Size([4, 8])
    ```
    """

    def __init__(self, config: GranAlignConfig) -> None:
        super().__init__(config)
        d = config.embed_dim
        if config.uses_region_features:
            self.vision_model = None
            vision_width = config.region_feature_dim
        else:
            self.vision_model = _drop_pooling_head(AutoModel.from_config(config.vision_config))
            vision_width = self._tower_width(config.vision_config)
        self.text_model = _drop_pooling_head(AutoModel.from_config(config.text_config))
        # no affine: the projection that follows can express it, and frozen inputs then need no gradient
        self.visual_norm = (
            nn.LayerNorm(vision_width, elementwise_affine=False)
            if config.vision_feature_norm == "layernorm"
            else None
        )
        self.visual_projection = nn.Linear(vision_width, d)
        self.text_projection = nn.Linear(self._tower_width(config.text_config), d)
        adapter_width = max(1, int(d * config.adapter_hidden_ratio))
        # Parts switched off for ablations are not built, so every parameter of a model is trained.
        self.significance_adapter = (
            TokenAdapter(d, adapter_width, config.gumbel_temperature)
            if config.use_significance_adapter
            else None
        )
        self.granularity_adapter = (
            TokenAdapter(d, adapter_width, config.gumbel_temperature)
            if config.use_granularity_adapter
            else None
        )
        self.region_prompting = self.region_uncertainty = None
        if config.use_region_prompting:
            self.region_prompting = RegionPrompting(
                d, config.num_regions, config.region_prompt_scale_init, config.region_prompt_bias_init
            )
            if config.use_uncertainty:
                self.region_uncertainty = RegionUncertainty(d, config.logvar_min, config.logvar_max)
        # CLIP's learnable temperature, log(1/τ); only InfoNCE depends on it, so it trains only there.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.infonce_temperature)))
        self.logit_scale.requires_grad_(config.learn_temperature and config.contrastive_loss == "infonce")
        self.post_init()

    @staticmethod
    def _tower_width(tower_config: AutoConfig) -> int:
        """Width of a tower's last hidden state (hidden_size, or the last stage of Swin/ConvNeXt)."""
        if getattr(tower_config, "model_type", "") == "timm_wrapper":
            # timm's `num_features`, the channels of `forward_features`: timm's Hub configs store it; else
            # (or with `model_args`, which may change it) ask the backbone, built on the meta device.
            # (timm is imported only here: a TimmWrapper tower cannot exist without it.)
            width = getattr(tower_config, "num_features", None)
            model_args = dict(tower_config.model_args or {})
            if isinstance(width, int) and not model_args:
                return width
            try:  # (in a try block: transformers' remote-code check then does not require timm)
                import timm
            except ImportError:
                raise ImportError(
                    f"a {tower_config.architecture!r} timm tower needs `pip install timm`"
                ) from None

            with torch.device("meta"):
                backbone = timm.create_model(
                    tower_config.architecture, pretrained=False, **{"num_classes": 0, **model_args}
                )
            if model_args.get("features_only"):
                return int(backbone.feature_info.channels()[-1])
            return int(backbone.num_features)
        for name in ("hidden_size", "embed_dim"):
            width = getattr(tower_config, name, None)
            if isinstance(width, int) and getattr(tower_config, "model_type", "") not in ("swin", "swinv2"):
                return width
        if getattr(tower_config, "hidden_sizes", None):
            return tower_config.hidden_sizes[-1]
        if tower_config.model_type in ("swin", "swinv2", "donut-swin", "maskformer-swin"):
            return int(tower_config.embed_dim * 2 ** (len(tower_config.depths) - 1))
        raise ValueError(f"cannot tell the output width of a {tower_config.model_type!r} tower")

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str | None,
        text_model_name_or_path: str,
        **config_kwargs,
    ) -> GranAlignModel:
        """Compose pretrained towers with freshly initialised GRM parts.

        Pass `None` as the vision tower together with `region_feature_dim=...` for precomputed regions.
        Keyword arguments prefixed `vision_kw_` / `text_kw_` go to the towers' `from_pretrained` (e.g.
        `text_kw_revision="main"`); the rest are `GranAlignConfig` fields.
        """
        vision_kwargs = _pop_prefixed(config_kwargs, "vision_kw_")
        text_kwargs = _pop_prefixed(config_kwargs, "text_kw_")
        text_model = AutoModel.from_pretrained(text_model_name_or_path, **text_kwargs)
        vision_model = None
        if vision_model_name_or_path is not None:
            tower_config = AutoConfig.from_pretrained(vision_model_name_or_path, **vision_kwargs)
            # a CLIP/SigLIP-style dual encoder: load its image tower only
            tower_config = getattr(tower_config, "vision_config", None) or tower_config
            vision_model = AutoModel.from_pretrained(
                vision_model_name_or_path, config=tower_config, **vision_kwargs
            )
            config_kwargs["vision_config"] = vision_model.config
        config = GranAlignConfig(text_config=text_model.config, **config_kwargs)
        model = cls(config)
        model.text_model.load_state_dict(_drop_pooling_head(text_model).state_dict())
        if vision_model is not None:
            model.vision_model.load_state_dict(_drop_pooling_head(vision_model).state_dict())
        return model

    # ------------------------------------------------------------------ encoders

    def _vision_tokens(
        self,
        pixel_values: torch.Tensor | None,
        region_features: torch.Tensor | None,
        region_mask: torch.Tensor | None,
        **tower_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ModelOutput | None]:
        """Image tokens before projection `[B, L_v, h]`, their mask and spatial mask `[B, L_v]`, and the
        vision tower's output (None for regions); `tower_kwargs` (`output_hidden_states`, ...) go to it."""
        if self.vision_model is None:
            if region_features is None:
                raise ValueError(
                    "this model takes precomputed region features: pass region_features [B, N, "
                    f"{self.config.region_feature_dim}] (and region_mask [B, N]), not pixel_values"
                )
            if region_features.dim() != 3 or region_features.shape[-1] != self.config.region_feature_dim:
                raise ValueError(
                    f"region_features must be [B, N, {self.config.region_feature_dim}], "
                    f"got {list(region_features.shape)}"
                )
            _check_finite(region_features, "region_features")
            if region_mask is None:
                region_mask = torch.ones(
                    region_features.shape[:2], dtype=torch.long, device=region_features.device
                )
            _check_mask(
                region_mask, region_features.shape[:2], "region_mask", "image needs at least one region"
            )
            return region_features, region_mask, region_mask, None
        _check_pixels(pixel_values)
        tower_output = self.vision_model(pixel_values=pixel_values, return_dict=True, **tower_kwargs)
        hidden = tower_output.last_hidden_state
        if isinstance(hidden, (list, tuple)):  # timm `features_only` backbones: the deepest feature map
            hidden = hidden[-1]
        timm_model = getattr(self.vision_model, "timm_model", None)
        if hidden.dim() == 4 and getattr(timm_model, "output_fmt", "NCHW") == "NHWC":  # timm Swin, MambaOut
            hidden = hidden.permute(0, 3, 1, 2)
        if hidden.dim() == 4:  # convolutional towers: [B, C, H, W] feature map → tokens
            hidden = hidden.flatten(2).transpose(1, 2)
        return (*self._tower_token_masks(hidden), tower_output)

    def vision_tower_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's token outputs `[B, L_v, h]` (what a frozen tower's cache stores); with
        `config.vision_tuned_blocks` = N, the feature map before its last N blocks, as tokens `[B, H·W, C]`."""
        if self.vision_model is None:
            raise ValueError("this model takes precomputed region features; it has no vision tower to run")
        tuned = self.config.vision_tuned_blocks
        if not tuned:
            return self._vision_tokens(pixel_values, None, None)[0]
        _check_pixels(pixel_values)
        hidden = self.vision_model.stem(pixel_values)
        for block in self.vision_model.blocks[:-tuned]:
            hidden = block(hidden)
        return hidden.flatten(2).transpose(1, 2)

    @property
    def vision_tuned_modules(self) -> list[nn.Module]:
        """The vision tower's part that runs after its cached states (`config.vision_tuned_blocks`)."""
        tuned = self.config.vision_tuned_blocks
        return [*self.vision_model.blocks[-tuned:], self.vision_model.head] if tuned else []

    def _run_tuned_blocks(self, states: torch.Tensor) -> torch.Tensor:
        """Cached states `[B, H·W, C]` (square grid) → the tower's last blocks and head → `[B, H'·W', h]`."""
        modules = self.vision_tuned_modules
        first = modules[0]
        channels = (first.depthwise if first.expand is None else first.expand).conv.in_channels
        batch, length, width = states.shape
        side = math.isqrt(length)
        if width != channels or side * side != length:
            raise ValueError(
                f"vision_hidden_states must be the square feature map before the last "
                f"{self.config.vision_tuned_blocks} tower blocks, [B, H*W, {channels}], got {list(states.shape)}"
            )
        hidden = (
            states.transpose(1, 2).reshape(batch, width, side, side).to(first.depthwise.conv.weight.dtype)
        )
        for module in modules:
            hidden = module(hidden)
        return hidden.flatten(2).transpose(1, 2)

    def text_tower_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's token outputs `[B, L_t, h]` (what a frozen tower's cache stores)."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _tower_token_masks(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vision tower states `[B, L_v, h]` with their token mask and spatial mask (prefix tokens off)."""
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        spatial = mask.clone()
        spatial[:, : self.config.num_prefix_tokens] = 0
        return hidden, mask, spatial

    def encode_image(
        self,
        pixel_values: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
    ) -> GranAlignImageOutput:
        """Encode images once: tokens, adapter mask, regions and their Gaussians (see `GranAlignImageOutput`).

        Args:
            pixel_values: `[B, 3, H, W]` for models with a vision tower.
            region_features: `[B, N, region_feature_dim]` precomputed regions, with region_mask `[B, N]`.
            vision_hidden_states: `[B, L_v, h]` outputs of this model's (frozen) vision tower computed
                earlier with `vision_tower_states`, instead of pixel_values: the tower is skipped.
        """
        return self._encode_image(pixel_values, region_features, region_mask, vision_hidden_states)[0]

    def _encode_image(
        self,
        pixel_values: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
        **tower_kwargs,
    ) -> tuple[GranAlignImageOutput, ModelOutput | None]:
        """`encode_image`, plus the vision tower's own output (None where the tower did not run)."""
        tower_output = None
        if vision_hidden_states is not None:
            if self.vision_model is None:
                raise ValueError(
                    "vision_hidden_states need a model with a vision tower; pass region_features"
                )
            if vision_hidden_states.dim() != 3:
                raise ValueError(
                    f"vision_hidden_states must be [B, L_v, h], got {list(vision_hidden_states.shape)}"
                )
            if self.config.vision_tuned_blocks:
                vision_hidden_states = self._run_tuned_blocks(vision_hidden_states)
            hidden, token_mask, spatial_mask = self._tower_token_masks(vision_hidden_states)
        else:
            hidden, token_mask, spatial_mask, tower_output = self._vision_tokens(
                pixel_values, region_features, region_mask, **tower_kwargs
            )
        hidden = hidden.to(self.visual_projection.weight.dtype)
        if self.visual_norm is not None:
            hidden = self.visual_norm(hidden)
        tokens = self.visual_projection(hidden)
        keep = _keep_weights(self.significance_adapter, tokens, token_mask)
        output = GranAlignImageOutput(
            tokens=tokens,
            token_mask=token_mask,
            keep_weights=keep,
            spatial_mask=spatial_mask,
            image_embeds=_masked_unit_mean(tokens, keep),
        )
        if self.region_prompting is None:
            return output, tower_output
        masked_tokens = tokens * keep.unsqueeze(-1).to(tokens.dtype)
        attention, normalized, means = self.region_prompting(masked_tokens, spatial_mask)
        output.region_attention, output.region_means, output.region_tokens = normalized, means, means
        if self.region_uncertainty is not None:
            output.region_logvars, output.region_tokens = self.region_uncertainty(means, normalized)
        usage = attention.sum(1)
        output.mixture_weights = usage / usage.sum(-1, keepdim=True).clamp_min(1e-6)
        return output, tower_output

    def encode_text(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_hidden_states: torch.Tensor | None = None,
    ) -> GranAlignTextOutput:
        """Encode captions once: input_ids, attention_mask `[B, L_t]` → `GranAlignTextOutput`.

        `text_hidden_states` `[B, L_t, h]` (the outputs of this model's frozen text tower computed earlier
        with `text_tower_states`, with their attention_mask) replace input_ids: the tower is skipped.
        """
        return self._encode_text(input_ids, attention_mask, text_hidden_states)[0]

    def _encode_text(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_hidden_states: torch.Tensor | None = None,
        **tower_kwargs,
    ) -> tuple[GranAlignTextOutput, ModelOutput | None]:
        """`encode_text`, plus the text tower's own output (None where the tower did not run)."""
        reference = text_hidden_states if text_hidden_states is not None else input_ids
        expected_dims = 3 if text_hidden_states is not None else 2
        if reference is None or reference.dim() != expected_dims:
            shape = None if reference is None else list(reference.shape)
            name = (
                "text_hidden_states must be a [B, L, h]"
                if expected_dims == 3
                else "input_ids must be a [B, L]"
            )
            raise ValueError(f"{name} tensor, got {shape}")
        if attention_mask is None:
            attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        _check_mask(attention_mask, reference.shape[:2], "attention_mask", "caption needs at least one token")
        tower_output = None
        positions = getattr(self.config.text_config, "max_position_embeddings", None)
        if text_hidden_states is None and isinstance(positions, int) and input_ids.shape[1] > positions:
            raise ValueError(
                f"input_ids are {input_ids.shape[1]} tokens long, more than the text tower's "
                f"max_position_embeddings={positions}: tokenize with max_length <= {positions}"
            )
        if text_hidden_states is None:
            tower_output = self.text_model(
                input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **tower_kwargs
            )
            text_hidden_states = tower_output.last_hidden_state
        tokens = self.text_projection(text_hidden_states.to(self.text_projection.weight.dtype))
        keep = _keep_weights(self.granularity_adapter, tokens, attention_mask)
        text = GranAlignTextOutput(
            tokens=tokens,
            token_mask=attention_mask,
            keep_weights=keep,
            text_embeds=_masked_unit_mean(tokens, keep),
        )
        return text, tower_output

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Global image embeddings, as transformers 5's CLIP returns them.

        Returns a `BaseModelOutputWithPooling`: `pooler_output` `[B, d]` the unit global embedding (e.g. for
        a shortlist before fine scoring), `last_hidden_state` the vision tower's `[B, L_v, h]` (the region
        features for region models), and the tower's `hidden_states` / `attentions` with
        `output_hidden_states` / `output_attentions`. `return_dict=False` gives a tuple.
        """
        images, tower = self._encode_image(pixel_values, region_features, region_mask, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=region_features if tower is None else tower.last_hidden_state,
            pooler_output=images.image_embeds,
            hidden_states=getattr(tower, "hidden_states", None),
            attentions=getattr(tower, "attentions", None),
        )

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """Global caption embeddings: `pooler_output` `[B, d]` unit vectors, `last_hidden_state` the text
        tower's `[B, L_t, h]`, and its `hidden_states` / `attentions` where asked (as `get_image_features`)."""
        texts, tower = self._encode_text(input_ids, attention_mask, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state,
            pooler_output=texts.text_embeds,
            hidden_states=tower.hidden_states,
            attentions=tower.attentions,
        )

    # ------------------------------------------------------------------ scoring

    def level_scores(
        self,
        image_outputs: GranAlignImageOutput,
        text_outputs: GranAlignTextOutput,
        image_chunk_size: int = 16,
        text_chunk_size: int = 256,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The three similarity levels for all pairs → `[3, N_img, N_txt]` (float32), chunk by chunk.

        Peak memory is about `image_chunk_size · L_v · text_chunk_size · L_t` cosines; `dtype` (e.g.
        `torch.bfloat16`) sets the precision of the token products.
        """
        images = code_images(
            image_outputs.tokens,
            image_outputs.token_mask,
            image_outputs.keep_weights,
            image_outputs.region_tokens,
            dtype,
        )
        texts = code_texts(text_outputs.tokens, text_outputs.token_mask, text_outputs.keep_weights, dtype)
        return chunked_level_similarities(
            images,
            texts,
            self.config.similarity_negative_slope,
            self.config.similarity_pooling,
            image_chunk_size,
            text_chunk_size,
        )

    def score(
        self,
        image_outputs: GranAlignImageOutput,
        text_outputs: GranAlignTextOutput,
        image_chunk_size: int = 16,
        text_chunk_size: int = 256,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """GRM similarity `a·S_ori + b·S_key + c·S_unc` of every image with every caption → `[N_img, N_txt]`."""
        levels = self.level_scores(image_outputs, text_outputs, image_chunk_size, text_chunk_size, dtype)
        return self._combine_levels(levels, image_outputs, text_outputs)

    def temperature_scale(self) -> torch.Tensor:
        """`exp(logit_scale)` clamped to `config.logit_scale_max`: the factor from scores to logits (1/τ)."""
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def _combine_levels(
        self, levels: torch.Tensor, image_outputs: GranAlignImageOutput, text_outputs: GranAlignTextOutput
    ) -> torch.Tensor:
        """`a·S_ori + b·S_key + c·S_unc` (+ `g·cos` of the global embeddings) of `[3, N, M]` levels."""
        return combine_levels(
            levels,
            self.config,
            lambda: global_similarities(image_outputs.image_embeds, text_outputs.text_embeds),
        )

    # ------------------------------------------------------------------ losses

    def compute_loss(
        self,
        image_outputs: GranAlignImageOutput,
        text_outputs: GranAlignTextOutput,
        image_ids: torch.Tensor | None = None,
        hardest_negative: bool | None = None,
        level_scores: torch.Tensor | None = None,
        caption_ids: torch.Tensor | None = None,
    ) -> GranAlignLoss:
        """The full GRM objective for a batch of B aligned pairs (image i ↔ caption i).

        Args:
            image_ids: `[B]` ids; captions of the same image are not negatives of each other.
            caption_ids: `[B]` ids of the caption strings; identical captions are not negatives either.
            hardest_negative: overrides `config.hardest_negative` (False = sum of violations, for warm-up).
            level_scores: `[3, B, B]` if already computed.
        """
        config = self.config
        batch = image_outputs.tokens.shape[0]
        if text_outputs.tokens.shape[0] != batch:
            raise ValueError(
                f"the loss needs aligned pairs: got {batch} images and {text_outputs.tokens.shape[0]} captions"
            )
        for name, ids in (("image_ids", image_ids), ("caption_ids", caption_ids)):
            if ids is not None and ids.shape != (batch,):
                raise ValueError(f"{name} must have shape [{batch}], got {list(ids.shape)}")
        if level_scores is None:
            # captions in length-sorted chunks cut to their widest: no work on padding (same scores)
            level_scores = self.level_scores(image_outputs, text_outputs, batch, _LOSS_TEXT_CHUNK)
        hardest = config.hardest_negative if hardest_negative is None else hardest_negative
        positives = positive_pair_mask(image_ids, batch, level_scores.device, caption_ids)
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        contrastive = list(zip(LEVEL_NAMES, level_scores, config.effective_level_weights, strict=True))
        global_weight = config.global_loss_weight + config.global_level_weight
        if global_weight > 0:
            # the global embeddings: a level of the score, or for embedding shortlists (not in the paper)
            cosines = global_similarities(image_outputs.image_embeds, text_outputs.text_embeds)
            contrastive.append(("global", cosines, global_weight))
        for name, scores, weight in contrastive:
            if weight == 0:
                continue
            if config.contrastive_loss == "hinge":
                terms[f"contrastive_{name}"] = hinge_triplet_loss(scores, positives, config.margin, hardest)
            else:
                terms[f"contrastive_{name}"] = infonce_loss(scores, positives, self.temperature_scale())
            weights[f"contrastive_{name}"] = weight
        if image_outputs.region_means is not None:
            masked_tokens = image_outputs.tokens * image_outputs.keep_weights.unsqueeze(-1)
            terms["recon"] = semantic_consistency_loss(
                image_outputs.region_means, masked_tokens, image_outputs.spatial_mask
            )
            terms["entropy"] = prompt_usage_negative_entropy(image_outputs.mixture_weights)
            weights.update(recon=config.recon_loss_weight, entropy=config.entropy_loss_weight)
        if image_outputs.region_logvars is not None:
            terms["kl"] = kl_to_standard_normal(
                image_outputs.region_means,
                image_outputs.region_logvars,
                variance_only=config.kl_variant == "variance",
            )
            weights["kl"] = config.kl_loss_weight
        if config.keep_ratio_loss_weight > 0:
            terms["keep_ratio"] = keep_ratio_loss(
                image_outputs.keep_weights, image_outputs.token_mask, config.keep_ratio_target
            ) + keep_ratio_loss(text_outputs.keep_weights, text_outputs.token_mask, config.keep_ratio_target)
            weights["keep_ratio"] = config.keep_ratio_loss_weight
        loss = sum(weights[name] * term.float() for name, term in terms.items())
        return GranAlignLoss(loss=loss, terms={name: term.detach() for name, term in terms.items()})

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        caption_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        hardest_negative: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> GranAlignOutput | tuple:
        """Score every image of the batch against every caption, and optionally compute the loss.

        Args:
            input_ids, attention_mask: `[B_txt, L_t]` tokenised captions.
            pixel_values: `[B_img, 3, H, W]`, or region_features `[B_img, N, D]` with region_mask `[B_img, N]`.
            image_ids: `[B]` image ids for the loss (same id: not a negative).
            caption_ids: `[B]` caption-string ids for the loss (identical captions: not negatives).
            return_loss: compute the GRM objective; needs B_img == B_txt aligned pairs.
            hardest_negative: overrides `config.hardest_negative` for this call.
            output_hidden_states, output_attentions: return the towers' hidden states / attentions in
                `text_model_output` / `vision_model_output` (as CLIP). Other keyword arguments go to both
                towers, as CLIP's do.
        """
        tower_kwargs = {**kwargs, "output_hidden_states": output_hidden_states}
        tower_kwargs["output_attentions"] = output_attentions
        tower_kwargs = {key: value for key, value in tower_kwargs.items() if value is not None}
        image_outputs, vision_tower = self._encode_image(
            pixel_values, region_features, region_mask, **tower_kwargs
        )
        text_outputs, text_tower = self._encode_text(input_ids, attention_mask, **tower_kwargs)
        num_images, num_texts = image_outputs.tokens.shape[0], text_outputs.tokens.shape[0]
        levels = self.level_scores(image_outputs, text_outputs, max(num_images, 1), max(num_texts, 1))
        logits_per_image = (
            self._combine_levels(levels, image_outputs, text_outputs) * self.temperature_scale()
        )
        loss = loss_terms = None
        if return_loss:
            objective = self.compute_loss(
                image_outputs, text_outputs, image_ids, hardest_negative, levels, caption_ids
            )
            loss, loss_terms = objective.loss, objective.terms
        output = GranAlignOutput(
            loss=loss,
            loss_terms=loss_terms,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            level_scores=levels,
            text_embeds=text_outputs.text_embeds,
            image_embeds=image_outputs.image_embeds,
            text_outputs=text_outputs,
            image_outputs=image_outputs,
            text_model_output=text_tower,
            vision_model_output=vision_tower,
        )
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return output if use_dict else output.to_tuple()

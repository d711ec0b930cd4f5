"""Configuration of GRM (granularity-aware and region-uncertain modeling).

This module travels to the Hub with a checkpoint (``trust_remote_code``): it imports only ``transformers``.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig
try:  # transformers >= 5.x: per-sub-config specs (`sub_configs` is derived from them)
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # pragma: no cover - older releases declare `sub_configs` directly
    SubConfigSpec = None

# Registers the "efficientnet_lite" vision tower with AutoConfig / AutoModel, here so that a remote-code copy
# of this file (no granalign package) resolves it too; `save_pretrained` ships the file with the checkpoint.
from .efficientnet_lite_granalign import EfficientNetLiteConfig  # noqa: F401

__all__ = ["ABLATION_VARIANTS", "VISION_PREFIX_TOKENS", "GranAlignConfig"]

# Tokens a vision tower puts before its spatial tokens ([CLS], distillation, registers). Towers not listed
# (Swin, ConvNeXt, SigLIP, ...) output spatial tokens only. DINOv2 adds its register tokens on top.
VISION_PREFIX_TOKENS: dict[str, int] = {
    "vit": 1,
    "deit": 2,
    "beit": 1,
    "data2vec-vision": 1,
    "dinov2": 1,
    "dinov2_with_registers": 1,
    "clip_vision_model": 1,
    "vit_msn": 1,
    "vit_mae": 1,
}

# The ablation study: each variant's config switches on top of the full model (`benchmarks/ablation.py`).
# "global_baseline" is a global dual encoder: no adapters, no regions, mean-pooled embeddings.
ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_significance_adapter": {"use_significance_adapter": False},
    "no_granularity_adapter": {"use_granularity_adapter": False},
    "no_region_prompting": {"use_region_prompting": False},
    "no_uncertainty": {"use_uncertainty": False},
    "global_baseline": {
        "use_significance_adapter": False,
        "use_granularity_adapter": False,
        "use_region_prompting": False,
        "similarity_pooling": "mean",
    },
}

_CONTRASTIVE_LOSSES = ("hinge", "infonce")
_KL_VARIANTS = ("full", "variance")
_POOLINGS = ("token_max", "mean")
_FEATURE_NORMS = ("none", "layernorm")
# Every float-valued GRM field: NaN or infinity in any of them is refused.
_FLOAT_FIELDS = (
    "adapter_hidden_ratio",
    "gumbel_temperature",
    "level_weights",
    "margin",
    "infonce_temperature",
    "logit_scale_max",
    "recon_loss_weight",
    "kl_loss_weight",
    "entropy_loss_weight",
    "keep_ratio_loss_weight",
    "keep_ratio_target",
    "global_level_weight",
    "global_loss_weight",
    "logvar_min",
    "logvar_max",
    "similarity_negative_slope",
    "region_prompt_scale_init",
    "region_prompt_bias_init",
    "initializer_range",
)
# The towers of `GranAlignConfig()` with no arguments (as VisionTextDualEncoderConfig's defaults).
DEFAULT_VISION_TYPE, DEFAULT_TEXT_TYPE = "vit", "bert"


def _resolve_subconfig(name: str, value: Any) -> PreTrainedConfig | None:
    """Turn a dict with a ``model_type`` (or a config) into a config object via ``AutoConfig``."""
    if value is None or isinstance(value, PreTrainedConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, a PreTrainedConfig or None, got {type(value).__name__}")
    value = dict(value)
    model_type = value.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            f"{name} needs a 'model_type' key (e.g. 'vit', 'swin', 'bert'), got keys {sorted(value)}"
        )
    try:
        return AutoConfig.for_model(model_type, **value)
    except ValueError:
        raise ValueError(
            f"{name}: unknown model_type {model_type!r}; expected a transformers model type such as "
            "'vit', 'swin', 'clip_vision_model', 'dinov2', 'convnext', 'bert', 'roberta'"
        ) from None


class GranAlignConfig(PreTrainedConfig):
    r"""Configuration of a [`GranAlignModel`]: two HF towers plus every GRM hyper-parameter.

    The image side is either a vision tower (`vision_config`) or precomputed region features of size
    `region_feature_dim` (e.g. 36 x 2048 detector regions); giving both is an error. With neither, as with
    no `text_config`, the towers are transformers' default ViT and BERT (so `GranAlignConfig()` is valid).

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*): any HF vision tower (ViT, Swin, CLIP-vision,
            DINOv2, ConvNeXt, ...), as a config or a dict with `model_type`.
        text_config (`dict` or `PreTrainedConfig`, *optional*): any HF text encoder (BERT, RoBERTa, MiniLM, ...).
        region_feature_dim (`int`, *optional*): feature size of precomputed regions, instead of a vision tower.
        embed_dim (`int`, defaults to 512): the shared token dimension d.
        num_regions (`int`, defaults to 5): number of region prompts K (paper: 5 for ViT, 50 for Swin).
        adapter_hidden_ratio (`float`, defaults to 0.5): adapter MLP width as a fraction of d.
        gumbel_temperature (`float`, defaults to 1.0): temperature τ of the adapters' Gumbel-Softmax.
        level_weights (`tuple[float, float, float]`, defaults to (0.4, 0.4, 0.2)): weights (a, b, c) of the
            original, key (adapter-masked) and uncertainty (region) similarity levels.
        contrastive_loss (`str`, defaults to "hinge"): "hinge" (VSE++ triplet) or "infonce".
        margin (`float`, defaults to 0.2): hinge margin.
        infonce_temperature (`float`, defaults to 0.05): InfoNCE temperature τ; with `learn_temperature` it is
            the initial value of the CLIP-style learnable `logit_scale = log(1/τ)`.
        learn_temperature (`bool`, defaults to True): learn `logit_scale` with InfoNCE (CLIP). The hinge loss
            does not depend on a scale, so with the hinge it stays fixed at `log(1/τ)`. `logits_per_image`
            are `exp(logit_scale) · score`, so softmax probabilities (zero-shot) are calibrated.
        logit_scale_max (`float`, defaults to 100.0): clamp of `exp(logit_scale)`, as CLIP.
        hardest_negative (`bool`, defaults to True): hinge on the hardest negative (else sum of violations).
        sum_violation_warmup_epochs (`int`, defaults to 1): epochs trained with the sum of violations first.
        recon_loss_weight (`float`, defaults to 1.0): λ_recon of the semantic-consistency loss.
        kl_loss_weight (`float`, defaults to 1e-3): λ_KL of the region Gaussians' KL to N(0, I).
        kl_variant (`str`, defaults to "full"): "full" KL or "variance" (drops the μ² term).
        entropy_loss_weight (`float`, defaults to 0.1): λ_ent of the prompt-usage entropy regulariser.
        keep_ratio_loss_weight (`float`, defaults to 0.0): weight of the optional `(mean(A) − ρ)²` penalty.
        keep_ratio_target (`float`, defaults to 0.5): ρ of that penalty.
        global_level_weight (`float`, defaults to 0.0): weight g of a fourth, global level in the score,
            `g · cos(image_embeds, text_embeds)` (the `get_*_features` embeddings), trained like the other
            levels by the contrastive loss with weight g. Not in the paper (0 turns it off).
        vision_feature_norm (`str`, defaults to "none"): "layernorm" normalises image tokens (tower outputs or
            precomputed region features, e.g. ReLU6 CNN features in [0, 6]) before the visual projection.
        vision_tuned_blocks (`int`, defaults to 0): with a frozen, cached vision tower, its last N blocks and
            its head conv still run (and train) after the cache: `vision_tower_states` stops before them and
            `encode_image(vision_hidden_states=...)` runs them. EfficientNet-Lite towers only; 0: none.
        global_loss_weight (`float`, defaults to 0.0): weight of an optional contrastive loss (the same
            hinge/InfoNCE) on the global embeddings (`get_image_features` / `get_text_features`). Not part
            of the paper; it makes the embedding shortlist of two-stage search (and FAISS) usable.
        logvar_min (`float`, defaults to -10.0) / logvar_max (`float`, defaults to 2.0): log-variance clamp.
        similarity_negative_slope (`float`, defaults to 0.1): LeakyReLU slope applied to token cosines.
        region_prompt_scale_init (`float`, defaults to 10.0) / region_prompt_bias_init (`float`, defaults to
            -5.0): initial scale s and bias b of the region attention `sigmoid(s·cos + b)`.
        vision_num_prefix_tokens (`int`, *optional*): tokens before the spatial ones ([CLS], registers) that
            region prompting skips; inferred from the vision tower's `model_type` when `None`.
        initializer_range (`float`, defaults to 0.02): std of the normal init of new layers.
        use_significance_adapter (`bool`, defaults to True) / use_granularity_adapter (`bool`, defaults to
            True): ablation switches; off, every real token is kept (A = 1).
        use_region_prompting (`bool`, defaults to True): ablation switch; off, there are no regions, no
            uncertainty level (its weight c is dropped) and no region losses.
        use_uncertainty (`bool`, defaults to True): ablation switch; off, region tokens are their means in
            training too and there is no KL term.
        similarity_pooling (`str`, defaults to "token_max"): "token_max" (bidirectional token max-pooling)
            or "mean" (cosine of keep-weighted mean embeddings: the global dual-encoder baseline).

    Example:
    ```python
    >>> from granalign import GranAlignConfig, GranAlignModel
    >>> config = GranAlignConfig(
    ...     vision_config={"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
    ...                    "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
    ...     text_config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
    ...                  "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100},
    ...     embed_dim=32, num_regions=3)
    >>> model = GranAlignModel(config)
    ```
    """

    model_type = "granalign"
    # CLIP's name for the shared embedding size (sentence-transformers reads it for the embedding dimension)
    attribute_map = {"projection_dim": "embed_dim"}  # noqa: RUF012 (transformers' class attribute)
    # The towers are sub-configs, so `attn_implementation=` and `dtype=` given to `from_pretrained` reach
    # them. vision_config is optional: models on precomputed regions have no vision tower.
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "vision_config": SubConfigSpec(AutoConfig, model_type=DEFAULT_VISION_TYPE, optional=True),
            "text_config": SubConfigSpec(AutoConfig, model_type=DEFAULT_TEXT_TYPE),
        }
    else:  # pragma: no cover
        sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PreTrainedConfig | None = None,
        text_config: dict | PreTrainedConfig | None = None,
        region_feature_dim: int | None = None,
        embed_dim: int = 512,
        num_regions: int = 5,
        adapter_hidden_ratio: float = 0.5,
        gumbel_temperature: float = 1.0,
        level_weights: tuple[float, float, float] | list[float] = (0.4, 0.4, 0.2),
        contrastive_loss: str = "hinge",
        margin: float = 0.2,
        infonce_temperature: float = 0.05,
        learn_temperature: bool = True,
        logit_scale_max: float = 100.0,
        hardest_negative: bool = True,
        sum_violation_warmup_epochs: int = 1,
        recon_loss_weight: float = 1.0,
        kl_loss_weight: float = 1e-3,
        kl_variant: str = "full",
        entropy_loss_weight: float = 0.1,
        keep_ratio_loss_weight: float = 0.0,
        keep_ratio_target: float = 0.5,
        vision_feature_norm: str = "none",
        vision_tuned_blocks: int = 0,
        global_level_weight: float = 0.0,
        global_loss_weight: float = 0.0,
        logvar_min: float = -10.0,
        logvar_max: float = 2.0,
        similarity_negative_slope: float = 0.1,
        region_prompt_scale_init: float = 10.0,
        region_prompt_bias_init: float = -5.0,
        vision_num_prefix_tokens: int | None = None,
        initializer_range: float = 0.02,
        use_significance_adapter: bool = True,
        use_granularity_adapter: bool = True,
        use_region_prompting: bool = True,
        use_uncertainty: bool = True,
        similarity_pooling: str = "token_max",
        **kwargs: Any,
    ) -> None:
        if vision_config is None and region_feature_dim is None:  # the default config: ViT + BERT
            vision_config = {"model_type": DEFAULT_VISION_TYPE}
        self.vision_config = _resolve_subconfig("vision_config", vision_config)
        self.text_config = _resolve_subconfig("text_config", text_config or {"model_type": DEFAULT_TEXT_TYPE})
        self.region_feature_dim = region_feature_dim
        self.embed_dim = embed_dim
        self.num_regions = num_regions
        self.adapter_hidden_ratio = adapter_hidden_ratio
        self.gumbel_temperature = gumbel_temperature
        self.level_weights = [float(w) for w in level_weights]
        self.contrastive_loss = contrastive_loss
        self.margin = margin
        self.infonce_temperature = infonce_temperature
        self.learn_temperature = learn_temperature
        self.logit_scale_max = logit_scale_max
        self.hardest_negative = hardest_negative
        self.sum_violation_warmup_epochs = sum_violation_warmup_epochs
        self.recon_loss_weight = recon_loss_weight
        self.kl_loss_weight = kl_loss_weight
        self.kl_variant = kl_variant
        self.entropy_loss_weight = entropy_loss_weight
        self.keep_ratio_loss_weight = keep_ratio_loss_weight
        self.keep_ratio_target = keep_ratio_target
        self.vision_feature_norm = vision_feature_norm
        self.vision_tuned_blocks = vision_tuned_blocks
        self.global_level_weight = global_level_weight
        self.global_loss_weight = global_loss_weight
        self.logvar_min = logvar_min
        self.logvar_max = logvar_max
        self.similarity_negative_slope = similarity_negative_slope
        self.region_prompt_scale_init = region_prompt_scale_init
        self.region_prompt_bias_init = region_prompt_bias_init
        self.vision_num_prefix_tokens = vision_num_prefix_tokens
        self.initializer_range = initializer_range
        self.use_significance_adapter = use_significance_adapter
        self.use_granularity_adapter = use_granularity_adapter
        self.use_region_prompting = use_region_prompting
        self.use_uncertainty = use_uncertainty
        self.similarity_pooling = similarity_pooling
        super().__init__(**kwargs)
        self.validate_grm()

    @property
    def uses_region_features(self) -> bool:
        """True when the image side is precomputed region features (no vision tower)."""
        return self.region_feature_dim is not None

    @property
    def num_prefix_tokens(self) -> int:
        """Non-spatial tokens at the start of the vision sequence (0 for region features)."""
        if self.vision_config is None:
            return 0
        if self.vision_num_prefix_tokens is not None:
            return self.vision_num_prefix_tokens
        registers = getattr(self.vision_config, "num_register_tokens", 0) or 0
        return VISION_PREFIX_TOKENS.get(self.vision_config.model_type, 0) + registers

    @property
    def effective_level_weights(self) -> list[float]:
        """(a, b, c), with c = 0 when region prompting is switched off."""
        a, b, c = self.level_weights
        return [a, b, c if self.use_region_prompting else 0.0]

    def validate_grm(self) -> None:
        """Raise `ValueError` naming the field and value of the first invalid GRM setting."""
        for name in _FLOAT_FIELDS:  # NaN passes every `<` / `>` check below, so it is refused first
            values = getattr(self, name)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    kind = "finite numbers" if isinstance(values, list) else "a finite number"
                    raise ValueError(f"{name} must be {kind}, got {values!r}")
        if self.text_config is None:
            raise ValueError(
                "text_config is required: a dict with 'model_type' such as {'model_type': 'bert'}"
            )
        if (self.vision_config is None) == (self.region_feature_dim is None):
            raise ValueError(
                "give exactly one image input: vision_config (a vision tower) or region_feature_dim "
                f"(precomputed regions); got vision_config={'set' if self.vision_config else None}, "
                f"region_feature_dim={self.region_feature_dim!r}"
            )
        positive_ints = {"embed_dim": self.embed_dim, "num_regions": self.num_regions}
        if self.region_feature_dim is not None:
            positive_ints["region_feature_dim"] = self.region_feature_dim
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        positive_floats = {
            "gumbel_temperature": self.gumbel_temperature,
            "infonce_temperature": self.infonce_temperature,
            "adapter_hidden_ratio": self.adapter_hidden_ratio,
            "logit_scale_max": self.logit_scale_max,
        }
        for name, value in positive_floats.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        non_negative = {
            "margin": self.margin,
            "recon_loss_weight": self.recon_loss_weight,
            "kl_loss_weight": self.kl_loss_weight,
            "entropy_loss_weight": self.entropy_loss_weight,
            "keep_ratio_loss_weight": self.keep_ratio_loss_weight,
            "global_loss_weight": self.global_loss_weight,
            "global_level_weight": self.global_level_weight,
            "similarity_negative_slope": self.similarity_negative_slope,
            "sum_violation_warmup_epochs": self.sum_violation_warmup_epochs,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if len(self.level_weights) != 3 or any(w < 0 for w in self.level_weights):
            raise ValueError(
                f"level_weights must be three non-negative weights (original, key, uncertainty), "
                f"got {self.level_weights!r}"
            )
        if sum(self.effective_level_weights) <= 0:
            raise ValueError(
                f"level_weights must not sum to 0, got {self.level_weights!r}"
                + (
                    ""
                    if self.use_region_prompting
                    else " (the uncertainty level is off with region prompting)"
                )
            )
        if self.similarity_pooling not in _POOLINGS:
            raise ValueError(
                f"similarity_pooling must be one of {_POOLINGS}, got {self.similarity_pooling!r}"
            )
        if self.contrastive_loss not in _CONTRASTIVE_LOSSES:
            raise ValueError(
                f"contrastive_loss must be one of {_CONTRASTIVE_LOSSES}, got {self.contrastive_loss!r}"
            )
        if self.vision_feature_norm not in _FEATURE_NORMS:
            raise ValueError(
                f"vision_feature_norm must be one of {_FEATURE_NORMS}, got {self.vision_feature_norm!r}"
            )
        if self.kl_variant not in _KL_VARIANTS:
            raise ValueError(f"kl_variant must be one of {_KL_VARIANTS}, got {self.kl_variant!r}")
        if not 0.0 <= self.keep_ratio_target <= 1.0:
            raise ValueError(f"keep_ratio_target must be in [0, 1], got {self.keep_ratio_target!r}")
        if not self.logvar_min < self.logvar_max:
            raise ValueError(
                f"logvar_min must be < logvar_max, got logvar_min={self.logvar_min!r}, logvar_max={self.logvar_max!r}"
            )
        if self.vision_num_prefix_tokens is not None and self.vision_num_prefix_tokens < 0:
            raise ValueError(f"vision_num_prefix_tokens must be >= 0, got {self.vision_num_prefix_tokens!r}")
        self._validate_tuned_blocks()

    def _validate_tuned_blocks(self) -> None:
        """`vision_tuned_blocks`: an integer in [0, the tower's blocks], on an EfficientNet-Lite tower."""
        value = self.vision_tuned_blocks
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"vision_tuned_blocks must be an integer >= 0, got {value!r}")
        if value == 0:
            return
        tower_type = getattr(self.vision_config, "model_type", None)
        if tower_type != "efficientnet_lite":
            raise ValueError(
                f"vision_tuned_blocks={value} needs an EfficientNet-Lite vision tower (stem, blocks, head), "
                f"got {tower_type or 'precomputed regions'!r}"
            )
        blocks = sum(self.vision_config.stage_repeats())
        if value > blocks:
            raise ValueError(f"vision_tuned_blocks must be <= the tower's {blocks} blocks, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """Serialise, turning the tower configs into dicts with their `model_type`."""
        output = super().to_dict()
        for key in ("vision_config", "text_config"):
            sub = getattr(self, key)
            if sub is not None:
                output[key] = sub.to_dict()
                output[key].pop("transformers_version", None)
        return output

"""Typed outputs of `GranAlignModel`. Shapes: B batch, L tokens, K regions, d embedding size.

Every tensor field of the encoder outputs is batch-first, so outputs can be sliced, gathered across
processes and concatenated. Travels to the Hub with a checkpoint: imports only torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .scoring_granalign import token_widths

__all__ = [
    "GranAlignImageOutput",
    "GranAlignLoss",
    "GranAlignOutput",
    "GranAlignTextOutput",
    "concat_image_outputs",
    "concat_text_outputs",
    "select_rows",
]


@dataclass
class GranAlignImageOutput(ModelOutput):
    """Everything the pairwise score needs about a batch of images, computed once per image.

    Attributes:
        tokens: `[B, L_v, d]` projected image tokens V (vision tower tokens, or projected region features).
        token_mask: `[B, L_v]` 1 for real tokens, 0 for padding.
        keep_weights: `[B, L_v]` significance-adapter keep probabilities A_V (0 at padding).
        spatial_mask: `[B, L_v]` 1 for tokens that region prompting groups (no [CLS], no padding).
        region_attention: `[B, L_v, K]` column-normalised region attention Â.
        region_means: `[B, K, d]` region means μ.
        region_logvars: `[B, K, d]` region log-variances log σ².
        region_tokens: `[B, K, d]` region tokens U (samples in training, the means in eval).
        mixture_weights: `[B, K]` mixture weights π (share of the sigmoid attention per region).
        image_embeds: `[B, d]` unit global embedding (keep-weighted mean of the unit tokens).
    """

    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    keep_weights: torch.Tensor | None = None
    spatial_mask: torch.Tensor | None = None
    region_attention: torch.Tensor | None = None
    region_means: torch.Tensor | None = None
    region_logvars: torch.Tensor | None = None
    region_tokens: torch.Tensor | None = None
    mixture_weights: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


@dataclass
class GranAlignTextOutput(ModelOutput):
    """Everything the pairwise score needs about a batch of captions.

    Attributes:
        tokens: `[B, L_t, d]` projected text tokens T (all tokens, [CLS]/[SEP] included).
        token_mask: `[B, L_t]` the attention mask.
        keep_weights: `[B, L_t]` granularity-adapter keep probabilities A_T (0 at padding).
        text_embeds: `[B, d]` unit global embedding.
    """

    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    keep_weights: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


@dataclass
class GranAlignLoss(ModelOutput):
    """The training objective: `loss` (scalar) and each of its terms (`terms`: name → scalar)."""

    loss: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] | None = None


@dataclass
class GranAlignOutput(ModelOutput):
    """Output of `GranAlignModel.forward`.

    Attributes:
        loss: scalar training loss (with `return_loss=True`).
        loss_terms: each loss term (contrastive per level, recon, kl, entropy, keep_ratio), unweighted.
        logits_per_image: `[B_img, B_txt]` GRM scores `a·S_ori + b·S_key + c·S_unc` times `exp(logit_scale)`
            (CLIP-style logits: a softmax over captions gives calibrated probabilities).
        logits_per_text: `[B_txt, B_img]` the transpose.
        level_scores: `[3, B_img, B_txt]` the original, key and uncertainty levels.
        text_embeds: `[B_txt, d]`, image_embeds: `[B_img, d]` unit global embeddings.
        text_outputs: `GranAlignTextOutput`, image_outputs: `GranAlignImageOutput` (masks, region
            attention, means, log-variances, mixture weights).
        text_model_output, vision_model_output: the towers' own outputs, as CLIP's (`last_hidden_state`, and
            `hidden_states` / `attentions` with `output_hidden_states` / `output_attentions`); no vision
            output for precomputed regions.
    """

    loss: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    level_scores: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_outputs: GranAlignTextOutput | None = None
    image_outputs: GranAlignImageOutput | None = None
    text_model_output: ModelOutput | None = None
    vision_model_output: ModelOutput | None = None


def _pad_and_cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate along the batch, zero-padding dimension `dim` to the longest."""
    longest = max(t.shape[dim] for t in tensors)
    padded = []
    for tensor in tensors:
        missing = longest - tensor.shape[dim]
        if missing:
            pad = [0, 0] * (tensor.dim() - 1 - dim) + [0, missing]
            tensor = F.pad(tensor, pad)
        padded.append(tensor)
    return torch.cat(padded, dim=0)


# The token dimension of each per-token field; other fields are concatenated as they are.
_TOKEN_DIM = {"tokens": 1, "token_mask": 1, "keep_weights": 1, "spatial_mask": 1, "region_attention": 1}


def _concat(outputs: list[ModelOutput], cls: type[ModelOutput]) -> ModelOutput:
    if not outputs:
        raise ValueError("need at least one output to concatenate, got an empty list")
    merged = {}
    for field in fields(cls):
        values = [getattr(output, field.name) for output in outputs]
        if any(value is None for value in values):
            continue
        dim = _TOKEN_DIM.get(field.name)
        merged[field.name] = _pad_and_cat(values, dim) if dim is not None else torch.cat(values, dim=0)
    return cls(**merged)


def concat_image_outputs(outputs: list[GranAlignImageOutput]) -> GranAlignImageOutput:
    """Concatenate image batches (e.g. a gallery encoded in batches), padding token dimensions."""
    return _concat(outputs, GranAlignImageOutput)


def concat_text_outputs(outputs: list[GranAlignTextOutput]) -> GranAlignTextOutput:
    """Concatenate caption batches, padding token dimensions."""
    return _concat(outputs, GranAlignTextOutput)


def select_rows(
    outputs: ModelOutput,
    rows: slice | torch.Tensor,
    device: torch.device | str | None = None,
    names: tuple[str, ...] | None = None,
) -> ModelOutput:
    """Items `rows` (a slice, or a tensor of row numbers) of image or text outputs, token fields cut to
    the columns some selected item uses (`token_widths`: no score changes), on `device`.

    `names` keeps only those fields (e.g. the ones a score reads); a slice on the same device copies
    nothing. Every field of the outputs is batch-first, so any field can be selected.
    """
    if isinstance(rows, torch.Tensor):
        rows = rows.to(outputs.token_mask.device)
    mask = outputs.token_mask[rows]
    width = max(int(token_widths(mask).max()), 1) if mask.shape[0] else mask.shape[1]
    fields = {}
    for name, value in outputs.items():
        if names is not None and name not in names:
            continue
        if name == "token_mask":
            value = mask[:, :width]
        else:
            value = value[:, :width][rows] if name in _TOKEN_DIM else value[rows]
        fields[name] = value.to(device) if device is not None else value
    return type(outputs)(**fields)

"""The two-stage engine as a full score matrix, for the evaluation protocol (`evaluate_protocol` and
the metric code run unchanged on it): pairs outside the shortlists score `-inf`, which the metric ranks
below every scored pair (ties count against the positive, so an unscored positive is a miss).
"""

from __future__ import annotations

from typing import Any

import torch

from granalign.outputs_granalign import GranAlignImageOutput, GranAlignTextOutput
from granalign.retrieval.rerank import pair_scores
from granalign.retrieval.search import DEFAULT_SHORTLIST
from granalign.retrieval.shortlist import check_shortlist_source, exact_topk, region_level_scores

__all__ = ["DIRECTIONS", "shortlist_pairs", "two_stage_scores"]

DIRECTIONS = ("union", "i2t", "t2i")


@torch.no_grad()
def two_stage_scores(
    model: Any,
    image_outputs: GranAlignImageOutput,
    text_outputs: GranAlignTextOutput,
    shortlist: int = DEFAULT_SHORTLIST,
    direction: str = "union",
    shortlist_by: str = "regions",
    pair_chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Two-stage scores as a full `[N_img, N_txt]` float32 matrix (CPU); unscored pairs are `-inf`.

    Drop-in for `model.score(image_outputs, text_outputs)` in the evaluation protocol. A pair is scored
    when the caption is among the image's `shortlist` best captions by the first stage (``"i2t"``), the
    image among the caption's `shortlist` best images (``"t2i"``), or either (``"union"``, the default:
    one matrix for both directions). For the exact per-direction result of a two-stage search, take
    image→text metrics from ``direction="i2t"`` and text→image metrics from ``direction="t2i"``.
    `shortlist_by`: ``"regions"`` (region level `S_unc`) or ``"embeddings"`` (global embeddings).
    """
    pairs = shortlist_pairs(model, image_outputs, text_outputs, shortlist, direction, shortlist_by, dtype)
    num_images, num_texts = image_outputs.tokens.shape[0], text_outputs.tokens.shape[0]
    fine = pair_scores(
        model, image_outputs, text_outputs, pairs // num_texts, pairs % num_texts,
        pair_chunk_size=pair_chunk_size, dtype=dtype, device=device,
    )  # fmt: skip
    scores = torch.full((num_images, num_texts), -torch.inf)
    scores.view(-1)[pairs] = fine.cpu()
    return scores


@torch.no_grad()
def shortlist_pairs(
    model: Any,
    image_outputs: GranAlignImageOutput,
    text_outputs: GranAlignTextOutput,
    shortlist: int = DEFAULT_SHORTLIST,
    direction: str = "union",
    shortlist_by: str = "regions",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The pairs `two_stage_scores` scores, as sorted linear indices `image * N_txt + text` `[P]`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    check_shortlist_source(shortlist_by, image_outputs)
    if shortlist < 1:
        raise ValueError(f"shortlist must be >= 1, got {shortlist}")
    num_images, num_texts = image_outputs.tokens.shape[0], text_outputs.tokens.shape[0]
    image_embeds, text_embeds = image_outputs.image_embeds, text_outputs.text_embeds
    if shortlist_by == "regions":
        config = getattr(model, "config", model)
        coarse = region_level_scores(
            image_outputs,
            text_outputs,
            config.similarity_negative_slope,
            dtype=dtype,
            pooling=config.similarity_pooling,
        ).cpu()
    else:
        coarse = None  # the embeddings' top-k is taken per direction below
    linear = []
    if direction in ("union", "i2t"):
        if coarse is not None:
            texts = coarse.topk(min(shortlist, num_texts), dim=1).indices  # [N_img, s]
        else:
            texts = exact_topk(image_embeds.cpu(), text_embeds.cpu(), shortlist)[1]
        linear.append(
            torch.arange(num_images).repeat_interleave(texts.shape[1]) * num_texts + texts.flatten()
        )
    if direction in ("union", "t2i"):
        if coarse is not None:
            images = coarse.t().topk(min(shortlist, num_images), dim=1).indices  # [N_txt, s]
        else:
            images = exact_topk(text_embeds.cpu(), image_embeds.cpu(), shortlist)[1]
        linear.append(
            images.flatten() * num_texts + torch.arange(num_texts).repeat_interleave(images.shape[1])
        )
    return torch.unique(torch.cat(linear))  # sorted: the pairs of one image are contiguous

"""Two-stage evaluation: the official protocol on exhaustive scores and on two-stage search scores from
the same encodings, and the recall the two-stage search loses.

The two-stage result per direction is what `granalign search` returns: image→text metrics come from
each image's shortlist of captions (`direction="i2t"`), text→image metrics from each caption's shortlist of
images (`direction="t2i"`). Under a fold protocol (COCO 1K) each fold is its own gallery, so shortlists
are drawn within the fold, as a search over that 1,000-image gallery would draw them.
"""

from __future__ import annotations

import bisect
import itertools
import time
from typing import Any

import torch
from datasets import Dataset

from granalign.evaluation.metrics import RECALL_KEYS
from granalign.evaluation.protocols import PROTOCOLS, evaluate_protocol
from granalign.evaluation.runner import caption_index
from granalign.outputs_granalign import GranAlignImageOutput, GranAlignTextOutput, select_rows
from granalign.retrieval.encode import encode_captions, encode_dataset_images
from granalign.retrieval.matrix import two_stage_scores
from granalign.retrieval.search import DEFAULT_SHORTLIST

__all__ = ["evaluate_split_two_stage", "fold_two_stage_scores"]


@torch.no_grad()
def fold_two_stage_scores(
    model: Any,
    images: GranAlignImageOutput,
    texts: GranAlignTextOutput,
    text_to_image: list[int],
    num_folds: int,
    direction: str,
    shortlist: int = DEFAULT_SHORTLIST,
    shortlist_by: str = "regions",
) -> torch.Tensor:
    """Scores `[N_img, N_txt]` (float32, CPU) where each fold's block (its images × its captions) holds
    `two_stage_scores` over that fold alone and every other entry is `-inf`. `text_to_image` must be
    non-decreasing (captions in image-row order, as `caption_index` gives them)."""
    num_images, num_texts = images.tokens.shape[0], texts.tokens.shape[0]
    if any(b < a for a, b in itertools.pairwise(text_to_image)):
        raise ValueError("text_to_image must list captions in image-row order (non-decreasing)")
    scores = torch.full((num_images, num_texts), -torch.inf)
    fold_size = num_images // num_folds
    for lo in range(0, num_images, fold_size):
        first, stop = bisect.bisect_left(text_to_image, lo), bisect.bisect_left(text_to_image, lo + fold_size)
        fold_images, fold_texts = (
            select_rows(images, slice(lo, lo + fold_size)),
            select_rows(texts, slice(first, stop)),
        )
        scores[lo : lo + fold_size, first:stop] = two_stage_scores(
            model,
            fold_images,
            fold_texts,
            shortlist=shortlist,
            direction=direction,
            shortlist_by=shortlist_by,
        )
    return scores


def _per_direction(i2t: dict[str, Any], t2i: dict[str, Any]) -> dict[str, Any]:
    """Image→text keys from `i2t`'s metrics, text→image keys from `t2i`'s, rSum recomputed."""
    merged = {key: (i2t if key.startswith("i2t") else t2i)[key] for key in i2t if key != "rsum"}
    merged["rsum"] = sum(merged[key] for key in RECALL_KEYS)
    return {key: merged[key] for key in i2t}


def evaluate_split_two_stage(
    model: Any,
    processor: Any,
    split: Dataset,
    protocol: str = "all",
    shortlist: int = DEFAULT_SHORTLIST,
    shortlist_by: str = "regions",
    batch_size: int = 64,
    progress: bool = True,
    check_size: bool = True,
) -> dict[str, Any]:
    """Exhaustive and two-stage metrics of `model` on `split`, encoded once.

    Returns `{"protocol", "exhaustive": protocol result, "two_stage": protocol result, "recall_lost":
    {R@K key: exhaustive − two-stage, rsum}, "shortlist", "shortlist_by", "seconds": {"exhaustive",
    "two_stage"}}`; the seconds time the scoring only (encoding is shared).
    """
    if len(split) == 0:
        raise ValueError("cannot evaluate an empty split")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known protocols: {sorted(PROTOCOLS)}")
    captions, text_to_image = caption_index(split)
    was_training = model.training
    model.eval()
    try:
        images, _ = encode_dataset_images(model, processor, split, batch_size, progress, output_device=None)
        texts = encode_captions(model, processor, captions, batch_size, progress, output_device=None)
        start = time.perf_counter()
        with torch.no_grad():
            exhaustive_scores = model.score(images, texts).float().cpu()
        exhaustive_seconds = time.perf_counter() - start
        exhaustive = evaluate_protocol(exhaustive_scores, text_to_image, protocol, check_size=check_size)
        num_folds = PROTOCOLS[protocol].num_folds
        start = time.perf_counter()
        by_direction = {
            direction: evaluate_protocol(
                fold_two_stage_scores(model, images, texts, text_to_image, num_folds, direction, shortlist,
                                      shortlist_by),
                text_to_image, protocol, check_size=check_size,
            )
            for direction in ("i2t", "t2i")
        }  # fmt: skip
        two_stage_seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    i2t, t2i = by_direction["i2t"], by_direction["t2i"]
    two_stage = {
        **i2t,
        "metrics": _per_direction(i2t["metrics"], t2i["metrics"]),
        "folds": [_per_direction(a, b) for a, b in zip(i2t["folds"], t2i["folds"], strict=True)],
    }
    lost = {key: exhaustive["metrics"][key] - two_stage["metrics"][key] for key in (*RECALL_KEYS, "rsum")}
    return {
        "protocol": protocol,
        "exhaustive": exhaustive,
        "two_stage": two_stage,
        "recall_lost": lost,
        "shortlist": shortlist,
        "shortlist_by": shortlist_by,
        "seconds": {"exhaustive": exhaustive_seconds, "two_stage": two_stage_seconds},
    }

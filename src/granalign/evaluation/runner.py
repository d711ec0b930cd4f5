"""Encode a dataset split with a GranAlign model, score every image against every caption, and apply a
retrieval protocol.

Images and captions are encoded once, in batches, by the encode path gallery indices use
(`granalign.retrieval.encode`, outputs kept on the model's device), then scored with the
model's chunked `score`, so no `N_img × N_txt × L_t × L_v` tensor is ever built. Captions are flattened in
row order, so `text_to_image[j]` is the row of caption `j` (docs/design.md). Under several processes
(an `Accelerator` with W > 1) each process encodes a contiguous block of rows and their captions, the
caption outputs are all-gathered, each process scores its own images against all captions, and the
score rows are gathered: every process returns the same metrics.
"""

from __future__ import annotations

import bisect
import contextlib
from typing import Any

import torch
from datasets import Dataset

from granalign.distributed import gather_output, gather_tensor
from granalign.evaluation.metrics import retrieval_metrics_identical_captions
from granalign.evaluation.protocols import PROTOCOLS, evaluate_protocol
from granalign.outputs_granalign import concat_text_outputs
from granalign.retrieval.encode import encode_captions, encode_dataset_images

__all__ = ["caption_index", "evaluate_split", "score_split"]


def caption_index(split: Dataset) -> tuple[list[str], list[int]]:
    """All captions of `split` in row order and, for each, the row index of its image."""
    captions: list[str] = []
    text_to_image: list[int] = []
    for row, row_captions in enumerate(split["captions"]):
        captions.extend(row_captions)
        text_to_image.extend([row] * len(row_captions))
    return captions, text_to_image


def _shard(num_rows: int, rank: int, world: int) -> range:
    return range(rank * num_rows // world, (rank + 1) * num_rows // world)


@torch.no_grad()
def score_split(
    model: Any,
    processor: Any,
    split: Dataset,
    batch_size: int = 64,
    image_chunk_size: int = 64,
    text_chunk_size: int = 256,
    accelerator: Any = None,
    progress: bool = True,
    states: Any = None,
) -> tuple[torch.Tensor, list[int]]:
    """Scores `[N_img, N_txt]` (float32, CPU) of every image of `split` with every caption, and
    `text_to_image`. The model is put in eval mode for the call and restored afterwards.

    `states` (`granalign.training.tower_cache.SplitStates`) holds frozen towers' cached outputs."""
    if len(split) == 0:
        raise ValueError("cannot evaluate an empty split")
    captions, text_to_image = caption_index(split)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    if len(split) < world:
        raise ValueError(f"cannot shard {len(split)} images over {world} processes")
    rows = _shard(len(split), rank, world)
    first, stop = bisect.bisect_left(text_to_image, rows.start), bisect.bisect_left(text_to_image, rows.stop)
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with autocast:
            image_states = None if states is None else states.images
            text_states = None if states is None else states.texts
            # the encode path of the gallery index, outputs left on the model's device
            images, _ = encode_dataset_images(
                model, processor, split, batch_size, show, None, rows=rows, image_states=image_states
            )
            texts = encode_captions(
                model, processor, captions[first:stop], batch_size, show, None, text_states, first
            )
            if world > 1:
                texts = gather_output(texts, concat_text_outputs)
            scores = model.score(
                images, texts, image_chunk_size=image_chunk_size, text_chunk_size=text_chunk_size
            )
        scores = scores.float()
        if world > 1:
            scores = gather_tensor(scores.contiguous())
    finally:
        model.train(was_training)
    return scores.cpu(), text_to_image


def evaluate_split(
    model: Any,
    processor: Any,
    split: Dataset,
    protocol: str = "all",
    batch_size: int = 64,
    image_chunk_size: int = 64,
    text_chunk_size: int = 256,
    accelerator: Any = None,
    progress: bool = True,
    check_size: bool = True,
    states: Any = None,
    identical_captions: bool = False,
) -> dict[str, Any]:
    """Retrieval metrics of `model` on `split` under `protocol` (see `evaluate_protocol`).

    Returns the protocol result: `{"protocol", "metrics": {i2t_r1, ..., rsum, ...}, "folds", ...}`.
    `states` holds frozen towers' cached outputs for the split (see `score_split`). With
    `identical_captions`, the result also holds `"identical_captions"`: the metrics when a caption counts
    as correct for every image with an identical caption (`retrieval_metrics_identical_captions`), beside
    the standard protocol's strict pairing.
    """
    if identical_captions and PROTOCOLS[protocol].num_folds > 1:
        raise ValueError(f"identical_captions needs a single-pool protocol, not {protocol!r}")
    scores, text_to_image = score_split(
        model, processor, split, batch_size, image_chunk_size, text_chunk_size, accelerator, progress, states
    )
    result = evaluate_protocol(scores, text_to_image, protocol, check_size=check_size)
    if identical_captions:
        captions, _ = caption_index(split)
        result["identical_captions"] = retrieval_metrics_identical_captions(scores, text_to_image, captions)
    return result

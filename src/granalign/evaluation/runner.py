"""Encode a dataset split with a GranAlign model, score every image against every caption, and apply a
retrieval protocol.

Images and captions are encoded once, in batches (`encode_image` / `encode_text`), then scored with the
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

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from granalign.evaluation.metrics import retrieval_metrics_identical_captions
from granalign.evaluation.protocols import PROTOCOLS, evaluate_protocol
from granalign.modeling_granalign import concat_image_outputs, concat_text_outputs
from granalign.outputs_granalign import GranAlignImageOutput, GranAlignTextOutput
from granalign.training.distributed import gather_output, gather_tensor

__all__ = ["caption_index", "encode_split_images", "encode_texts", "evaluate_split", "score_split"]


def caption_index(split: Dataset) -> tuple[list[str], list[int]]:
    """All captions of `split` in row order and, for each, the row index of its image."""
    captions: list[str] = []
    text_to_image: list[int] = []
    for row, row_captions in enumerate(split["captions"]):
        captions.extend(row_captions)
        text_to_image.extend([row] * len(row_captions))
    return captions, text_to_image


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=description, disable=not enabled, leave=False, dynamic_ncols=True)


@torch.no_grad()
def encode_split_images(
    model: Any,
    processor: Any,
    split: Dataset,
    rows: range,
    batch_size: int = 64,
    progress: bool = True,
    image_states: Any = None,
) -> GranAlignImageOutput:
    """Encode the images (or precomputed regions) of `split[rows]` in batches → one image output.

    `image_states` (a frozen vision tower's `TowerStates` for the split's rows) skips the tower.
    """
    device = _device(model)
    uses_regions = "region_features" in split.column_names
    table = split.with_format("numpy", columns=["region_features"]) if uses_regions else split
    outputs = []
    with _progress(len(rows), "encode images", progress) as bar:
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            if image_states is not None:
                states, _ = image_states.batch(range(start, stop))
                out = model.encode_image(vision_hidden_states=states.to(device))
            elif uses_regions:
                regions = [np.asarray(x, dtype=np.float32) for x in table[start:stop]["region_features"]]
                inputs = processor(regions=regions, return_tensors="pt")
                out = model.encode_image(
                    region_features=inputs["region_features"].to(device),
                    region_mask=inputs["region_mask"].to(device),
                )
            else:
                inputs = processor(images=split[start:stop]["image"], return_tensors="pt")
                out = model.encode_image(pixel_values=inputs["pixel_values"].to(device))
            outputs.append(out)
            bar.update(stop - start)
    return concat_image_outputs(outputs)


@torch.no_grad()
def encode_texts(
    model: Any,
    processor: Any,
    captions: list[str],
    batch_size: int = 64,
    progress: bool = True,
    text_states: Any = None,
    first_index: int = 0,
) -> GranAlignTextOutput:
    """Encode `captions` in batches (padded to the longest of each batch) → one text output.

    `text_states` (a frozen text tower's `TowerStates`, where `captions[i]` is item `first_index + i`)
    skips the tower.
    """
    if not captions:
        raise ValueError("no captions to encode")
    device = _device(model)
    outputs = []
    with _progress(len(captions), "encode captions", progress) as bar:
        for start in range(0, len(captions), batch_size):
            chunk = captions[start : start + batch_size]
            if text_states is not None:
                first = first_index + start
                states, mask = text_states.batch(range(first, first + len(chunk)))
                outputs.append(
                    model.encode_text(attention_mask=mask.to(device), text_hidden_states=states.to(device))
                )
            else:
                inputs = processor(text=chunk, padding="longest", return_tensors="pt")
                outputs.append(
                    model.encode_text(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
                )
            bar.update(len(chunk))
    return concat_text_outputs(outputs)


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
            images = encode_split_images(model, processor, split, rows, batch_size, show, image_states)
            texts = encode_texts(
                model, processor, captions[first:stop], batch_size, show, text_states, first_index=first
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

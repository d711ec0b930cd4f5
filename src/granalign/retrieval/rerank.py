"""Fine-grained GRM scores of chosen (image, caption) pairs only: the gathered layout of the one kernel.

`GranAlignModel.score` scores every image against every caption (an outer product of chunks). A
two-stage search only needs the shortlisted pairs, `P ≪ N_img · N_txt`. Here:

1. the items the pairs refer to are coded once (`code_images` / `code_texts` of `scoring_granalign`:
   unit tokens plus the two masking coordinates), unique items only, padding columns dropped;
2. the pairs are grouped by image into *segments* (one image, up to `pair_chunk_size` of its captions),
   and segments of similar length are stacked into blocks of `B` images × `n` caption slots
   (`B · n ≤ pair_chunk_size`; short segments repeat their last caption, whose scores are dropped);
3. each block is scored by `scoring_granalign.level_similarities` itself, with the captions in its
   per-image layout `[B, n, L_t, ...]` (one batched product per block), so every level, pooling and
   model variant is the model's own; `combine_levels` turns the levels into the score.

A shortlist (one caption query, many candidate images; one image query, many captions; a score matrix
restricted to shortlisted pairs) thus costs one product per block, and the image side is never copied
per pair. Memory: `pair_chunk_size · L_v · L_t` cosines plus the coded items, whatever `P`.
"""

from __future__ import annotations

from typing import Any

import torch

from granalign.outputs_granalign import GranAlignImageOutput, GranAlignTextOutput, select_rows
from granalign.scoring_granalign import (
    CodedTexts,
    code_images,
    code_texts,
    combine_levels,
    global_similarities,
    level_similarities,
)

__all__ = ["pair_level_scores", "pair_scores"]

# The fields a score reads (the re-rank copies only these to the scoring device).
_SCORED = ("tokens", "token_mask", "keep_weights", "region_tokens")


def _code_rows(outputs: Any, rows: torch.Tensor, dtype: torch.dtype | None, device: Any) -> Any:
    """Code the items at `rows` of image or text outputs (in that order), trailing padding dropped."""
    count = outputs.tokens.shape[0]
    if rows.numel() == count and torch.equal(rows.cpu(), torch.arange(count)):
        rows = slice(0, count)  # every item in order (e.g. a gallery of exactly the candidates): no copy
    part = select_rows(outputs, rows, device, names=_SCORED)
    if isinstance(outputs, GranAlignImageOutput):
        return code_images(part.tokens, part.token_mask, part.keep_weights, part.region_tokens, dtype)
    return code_texts(part.tokens, part.token_mask, part.keep_weights, dtype)


def _select(coded: Any, positions: Any) -> Any:
    """Rows `positions` of every field of a `CodedImages` / `CodedTexts` (advanced indexing: on CPU it is
    much faster than `index_select` for 3-D tensors)."""
    return type(coded)(*(None if field is None else field[positions] for field in coded))


def _check_index(index: torch.Tensor, size: int, name: str) -> torch.Tensor:
    index = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        bad = index[(index < 0) | (index >= size)][0]
        raise ValueError(f"{name} holds {int(bad)}, outside the {size} items it indexes")
    return index


def _segments(image_pos: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group pair positions by image into segments of at most `max_length` pairs, longest first.

    Returns the pair order `[P]` (pairs sorted by image) and, per segment, its start in that order and its
    length, sorted by decreasing length.
    """
    order = torch.argsort(image_pos, stable=True)
    _, counts = torch.unique_consecutive(image_pos[order], return_counts=True)
    ends = torch.cumsum(counts, 0)
    starts, lengths = [], []
    for end, count in zip(ends.tolist(), counts.tolist(), strict=True):
        for offset in range(0, count, max_length):
            starts.append(end - count + offset)
            lengths.append(min(max_length, count - offset))
    starts_t, lengths_t = torch.tensor(starts), torch.tensor(lengths)
    by_length = torch.argsort(lengths_t, descending=True, stable=True)
    return order, starts_t[by_length], lengths_t[by_length]


@torch.no_grad()
def pair_level_scores(
    image_outputs: GranAlignImageOutput,
    text_outputs: GranAlignTextOutput,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    negative_slope: float = 0.1,
    pair_chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    pooling: str = "token_max",
) -> torch.Tensor:
    """The three GRM levels of the pairs `(image_index[p], text_index[p])` → `[3, P]` float32; equals
    `model.level_scores(...)[:, image_index, text_index]` (uncertainty 0 for images without regions).

    Args:
        image_outputs, text_outputs: encoded images `[N_img, ...]` and captions `[N_txt, ...]` (any device).
        image_index, text_index: `[P]` rows of the pairs to score, in any order.
        pair_chunk_size: pairs per batched product; peak memory ~ `pair_chunk_size · L_v · L_t` cosines.
        dtype: precision of the token products (as in `GranAlignModel.level_scores`).
        device: where to compute (default: the device of `image_outputs.tokens`).
        pooling: the model's `similarity_pooling` ("token_max" or "mean").
    """
    if pair_chunk_size < 1:
        raise ValueError(f"pair_chunk_size must be >= 1, got {pair_chunk_size}")
    image_index = _check_index(image_index, image_outputs.tokens.shape[0], "image_index")
    text_index = _check_index(text_index, text_outputs.tokens.shape[0], "text_index")
    if image_index.shape != text_index.shape:
        raise ValueError(
            f"image_index and text_index must pair up, got {image_index.numel()} and {text_index.numel()}"
        )
    device = torch.device(device) if device is not None else image_outputs.tokens.device
    scores = torch.empty((3, image_index.numel()), dtype=torch.float32, device=device)
    if image_index.numel() == 0:
        return scores
    image_rows, image_pos = torch.unique(image_index, return_inverse=True)
    text_rows, text_pos = torch.unique(text_index, return_inverse=True)
    order, starts, lengths = _segments(image_pos, pair_chunk_size)
    # code the images in segment order, so the images of a block are a slice (no per-pair copies)
    images = _code_rows(image_outputs, image_rows[image_pos[order[starts]]], dtype, device)
    texts = _code_rows(text_outputs, text_rows, dtype, device)
    first = 0
    while first < len(starts):
        slots = int(lengths[first])  # the longest segment of the block (lengths decrease)
        block = slice(first, first + max(1, pair_chunk_size // slots))
        offsets = torch.minimum(torch.arange(slots), lengths[block, None] - 1)  # [B, n], repeats the last
        pairs = order[starts[block, None] + offsets]  # [B, n] pair positions
        block_texts = _select(texts, text_pos[pairs.flatten()].to(device))  # [B · n, ...]
        per_image = CodedTexts(*(f.view(pairs.shape[0], slots, *f.shape[1:]) for f in block_texts))
        levels = level_similarities(_select(images, block), per_image, negative_slope, pooling)
        real = torch.arange(slots) < lengths[block, None]
        scores[:, pairs[real].to(device)] = levels[:, real.to(device)]
        first = block.stop
    return scores


def pair_scores(
    model: Any,
    image_outputs: GranAlignImageOutput,
    text_outputs: GranAlignTextOutput,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    pair_chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """GRM scores `[P]` of the given pairs; equals `model.score(...)[image_index, text_index]`.

    `model` is a `GranAlignModel` or its config (the similarity settings, level weights and global level
    weight are read from it).
    """
    config = getattr(model, "config", model)
    levels = pair_level_scores(
        image_outputs,
        text_outputs,
        image_index,
        text_index,
        config.similarity_negative_slope,
        pair_chunk_size,
        dtype,
        device,
        config.similarity_pooling,
    )

    def global_cosines() -> torch.Tensor:  # the global level: cosines of each pair's unit embeddings
        image, text = image_outputs.image_embeds, text_outputs.text_embeds
        rows = torch.as_tensor(image_index, dtype=torch.long).flatten().to(image.device)
        columns = torch.as_tensor(text_index, dtype=torch.long).flatten().to(text.device)
        return global_similarities(image[rows], text[columns].to(image.device), paired=True)

    return combine_levels(levels, config, global_cosines)

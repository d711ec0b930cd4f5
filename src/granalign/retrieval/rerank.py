"""Fine-grained GRM scores of chosen (image, caption) pairs only: the gathered variant of the kernel.

`GranAlignModel.score` scores every image against every caption (an outer product of chunks). A
two-stage search only needs the shortlisted pairs, `P ≪ N_img · N_txt`. Here:

1. the items the pairs refer to are coded once (`code_images` / `code_texts` of `scoring_granalign`:
   unit tokens plus the two masking coordinates), unique items only;
2. the pairs are grouped by image into *segments* (one image, up to `pair_chunk_size` of its captions),
   and segments of similar length are stacked into blocks of `B` images × `n` caption slots
   (`B · n ≤ pair_chunk_size`; short segments repeat their last caption, whose scores are dropped);
3. one batched matrix product per block gives the cosines `[B, L_v, n, L_t]` of every image with its
   own captions — the chunk kernel's layout, with captions that differ per image — pooled by
   `pooled_similarity` itself, with per-image caption weights `[B, n, L_t]`.

A shortlist (one caption query, many candidate images; one image query, many captions; a score matrix
restricted to shortlisted pairs) thus costs one product per block, and the image side is never copied
per pair. Memory: `pair_chunk_size · L_v · L_t` cosines plus the coded items, whatever `P`.
"""

from __future__ import annotations

from typing import Any

import torch

from granalign.outputs_granalign import GranAlignImageOutput, GranAlignTextOutput
from granalign.scoring_granalign import CodedImages, CodedTexts, code_images, code_texts, pooled_similarity

__all__ = ["block_level_similarities", "combine_levels", "pair_level_scores", "pair_scores", "trim_padding"]


def block_level_similarities(images: CodedImages, texts: CodedTexts, negative_slope: float) -> torch.Tensor:
    """The three GRM levels of image `b` with each of its own `n` captions → `[3, B, n]` float32.

    `images` holds `B` coded images; `texts` holds `B · n` coded captions, image `b`'s at `b·n … b·n + n−1`.
    """
    num_images, length_v, dim = images.tokens.shape
    if texts.tokens.shape[0] % num_images:
        raise ValueError(f"{texts.tokens.shape[0]} captions cannot be split evenly over {num_images} images")
    slots, length_t = texts.tokens.shape[0] // num_images, texts.tokens.shape[1]
    text_tokens = texts.tokens.reshape(num_images, slots * length_t, dim).transpose(1, 2)  # [B, d + 2, n·L_t]

    def per_image(field: torch.Tensor) -> torch.Tensor:
        return field.reshape(num_images, slots, length_t)

    cosine = torch.bmm(images.tokens, text_tokens).view(num_images, length_v, slots, length_t)
    original = pooled_similarity(cosine, images.valid, per_image(texts.valid), negative_slope)
    text_weights, text_scales = per_image(texts.weights), per_image(texts.scales)
    key = pooled_similarity(cosine, images.weights, text_weights, negative_slope, images.scales, text_scales)
    del cosine
    region_cosine = torch.bmm(images.regions, text_tokens).view(num_images, -1, slots, length_t)
    region_weights = torch.ones(region_cosine.shape[:2], device=region_cosine.device)
    uncertainty = pooled_similarity(
        region_cosine, region_weights, text_weights, negative_slope, text_scales=text_scales
    )
    return torch.stack([original, key, uncertainty])


def trim_padding(mask: torch.Tensor) -> int:
    """Token length `L' ≤ L` that drops the trailing columns of `mask` `[B, L]` where every row is padding."""
    used = mask.ne(0).any(0).nonzero()
    return int(used.max()) + 1 if used.numel() else 1


def _code_rows(outputs: Any, rows: torch.Tensor, dtype: torch.dtype | None, device: Any) -> Any:
    """Code the items at `rows` of image or text outputs (in that order), trailing padding dropped."""
    rows = rows.to(outputs.tokens.device)
    mask = outputs.token_mask[rows]
    length = trim_padding(mask)

    def take(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, :length][rows].to(device)

    if isinstance(outputs, GranAlignImageOutput):
        regions = outputs.region_tokens[rows].to(device)
        return code_images(
            take(outputs.tokens), mask[:, :length].to(device), take(outputs.keep_weights), regions, dtype
        )
    return code_texts(take(outputs.tokens), mask[:, :length].to(device), take(outputs.keep_weights), dtype)


def _select(coded: Any, positions: torch.Tensor) -> Any:
    """Rows `positions` of every field of a `CodedImages` / `CodedTexts` (advanced indexing: on CPU it is
    much faster than `index_select` for 3-D tensors)."""
    return type(coded)(*(field[positions] for field in coded))


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
) -> torch.Tensor:
    """The three GRM levels of the pairs `(image_index[p], text_index[p])` → `[3, P]` float32.

    Args:
        image_outputs, text_outputs: encoded images `[N_img, ...]` and captions `[N_txt, ...]` (any device).
        image_index, text_index: `[P]` rows of the pairs to score, in any order.
        pair_chunk_size: pairs per batched product; peak memory ~ `pair_chunk_size · L_v · L_t` cosines.
        dtype: precision of the token products (as in `GranAlignModel.level_scores`).
        device: where to compute (default: the device of `image_outputs.tokens`).
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
        levels = block_level_similarities(
            CodedImages(*(field[block] for field in images)),
            _select(texts, text_pos[pairs.flatten()].to(device)),
            negative_slope,
        )
        real = torch.arange(slots) < lengths[block, None]
        scores[:, pairs[real].to(device)] = levels[:, real.to(device)]
        first = block.stop
    return scores


def combine_levels(levels: torch.Tensor, level_weights: Any) -> torch.Tensor:
    """`a·S_ori + b·S_key + c·S_unc` of `[3, ...]` levels with the config's `level_weights` `(a, b, c)`."""
    weights = torch.as_tensor(list(level_weights), dtype=levels.dtype, device=levels.device)
    return torch.einsum("l,l...->...", weights, levels)


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

    `model` is a `GranAlignModel` or its config (only `level_weights` and `similarity_negative_slope` are read).
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
    )
    scores = combine_levels(levels, config.level_weights)
    global_weight = getattr(config, "global_level_weight", 0.0)
    if global_weight > 0:  # the global level: cosines of the unit global embeddings of each pair
        image = image_outputs.image_embeds[image_index.to(image_outputs.image_embeds.device)]
        text = text_outputs.text_embeds[text_index.to(text_outputs.text_embeds.device)]
        scores = scores + global_weight * (image * text).sum(-1).float().to(scores.device)
    return scores

"""Bidirectional retrieval metrics (R@K, median/mean rank) on a precomputed image-text score matrix.

Ranks are 1-based ranks of the best-ranked positive. **Ties are counted pessimistically**: a negative
whose score equals the positive's score ranks above it, so a constant score matrix gives R@1 = 0
(not 100) and a scorer cannot gain from emitting ties. Positives tied with each other do not push one
another down. Median rank follows VSE++/SCAN: ``floor(median(ranks))``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from granalign.data.captions import caption_ids

__all__ = [
    "METRIC_KEYS",
    "RECALL_KEYS",
    "RECALL_KS",
    "retrieval_metrics",
    "retrieval_metrics_identical_captions",
    "retrieval_ranks",
    "text_to_image_from_caption_ids",
]

RECALL_KS: tuple[int, ...] = (1, 5, 10)
RECALL_KEYS: tuple[str, ...] = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS)
METRIC_KEYS: tuple[str, ...] = (*RECALL_KEYS, "rsum", "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")

# Largest comparison block built at once (elements); working memory is ~20 bytes per element (the
# boolean block plus the reduction's int64 temporaries), so 2**22 -> ~80 MB, far below COCO-5K scores.
DEFAULT_MAX_CHUNK_ELEMENTS = 2**22


def _as_scores(scores: Any) -> torch.Tensor:
    """Validate `scores` `[N_img, N_txt]` and return it as a real-valued tensor (no copy when possible)."""
    if isinstance(scores, np.ndarray):
        with warnings.catch_warnings():  # read-only arrays are fine: the scores are never written to
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(scores)
    elif isinstance(scores, torch.Tensor):
        tensor = scores.detach()
    else:
        raise ValueError(f"scores must be a numpy array or torch tensor, got {type(scores).__name__}")
    if tensor.ndim != 2:
        raise ValueError(f"scores must be 2-D [N_img, N_txt], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"scores must have at least one image and one text, got shape {tuple(tensor.shape)}")
    if tensor.is_complex():
        raise ValueError(f"scores must be real-valued, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    return tensor


def _as_text_to_image(
    text_to_image: Any, num_images: int, num_texts: int, device: torch.device
) -> torch.Tensor:
    """Validate `text_to_image` `[N_txt]` (image row of each caption) and return it as an int64 tensor."""
    if isinstance(text_to_image, torch.Tensor):
        array = text_to_image.detach().cpu().numpy()
    else:
        array = np.asarray(text_to_image)
    if array.ndim != 1:
        raise ValueError(f"text_to_image must be 1-D [N_txt], got shape {array.shape}")
    if array.shape[0] != num_texts:
        raise ValueError(
            f"text_to_image has {array.shape[0]} entries but scores has {num_texts} text columns; "
            "expected one image index per caption"
        )
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    bad = np.flatnonzero((array < 0) | (array >= num_images))
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"text_to_image[{j}] = {int(array[j])} is out of range; expected an image index in "
            f"[0, {num_images}) ({bad.size} bad entries)"
        )
    counts = np.bincount(array, minlength=num_images)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"every image needs at least one caption, but {empty.size} image(s) have none, e.g. rows "
            f"{empty[:5].tolist()}"
        )
    return torch.from_numpy(array).to(device)


def _chunk_size(other_dim: int, max_chunk_elements: int) -> int:
    if max_chunk_elements < 1:
        raise ValueError(f"max_chunk_elements must be >= 1, got {max_chunk_elements}")
    return max(1, max_chunk_elements // other_dim)


def retrieval_ranks(
    scores: np.ndarray | torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of the best positive: image→text `[N_img]` and text→image `[N_txt]` (int64).

    `scores` is `[N_img, N_txt]`, higher = more similar; `text_to_image[j]` is the image row of caption
    `j`. Ties with negatives count pessimistically (see the module docstring). Queries are processed in
    chunks so no intermediate exceeds `max_chunk_elements` booleans.
    """
    s = _as_scores(scores)
    num_images, num_texts = s.shape
    t2i = _as_text_to_image(text_to_image, num_images, num_texts, s.device)
    positive = s[t2i, torch.arange(num_texts, device=s.device)]  # [N_txt] score of each caption's image

    # image -> text: rank = 1 + #negatives scoring >= the image's best positive.
    best = torch.full((num_images,), -torch.inf, dtype=s.dtype, device=s.device)
    best = best.scatter_reduce(0, t2i, positive, reduce="amax")  # [N_img]
    tied_positives = torch.zeros(num_images, dtype=torch.int64, device=s.device)
    tied_positives.scatter_add_(0, t2i, (positive >= best[t2i]).long())  # positives at the best score
    i2t = torch.empty(num_images, dtype=torch.int64, device=s.device)
    step = _chunk_size(num_texts, max_chunk_elements)
    for start in range(0, num_images, step):
        block = s[start : start + step]  # [chunk, N_txt]
        if torch.isnan(block).any():
            row = start + int(torch.isnan(block).any(dim=1).nonzero()[0])
            raise ValueError(f"scores contain NaN (first in image row {row}); expected finite or ±inf values")
        at_least = (block >= best[start : start + step, None]).sum(dim=1)
        i2t[start : start + step] = 1 + at_least - tied_positives[start : start + step]

    # text -> image: rank = #images scoring >= the positive (the positive counts itself).
    t2i_ranks = torch.empty(num_texts, dtype=torch.int64, device=s.device)
    step = _chunk_size(num_images, max_chunk_elements)
    for start in range(0, num_texts, step):
        block = s[:, start : start + step]  # [N_img, chunk] view
        t2i_ranks[start : start + step] = (block >= positive[None, start : start + step]).sum(dim=0)
    return i2t.cpu().numpy(), t2i_ranks.cpu().numpy()


def _rank_summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    n = ranks.shape[0]
    out = {f"{prefix}_r{k}": 100.0 * int((ranks <= k).sum()) / n for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)))
    out[f"{prefix}_meanr"] = int(ranks.sum()) / n
    return out


def retrieval_metrics(
    scores: np.ndarray | torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> dict[str, float]:
    """R@1/5/10 (percent) both ways, `rsum`, and median/mean rank from scores `[N_img, N_txt]`.

    `text_to_image` `[N_txt]` gives the image row of each caption (any number ≥ 1 per image). Image→text
    counts an image as correct at K if ANY of its captions is in the top K; text→image is per caption.
    Keys (in order): `METRIC_KEYS`. Ties count pessimistically (see the module docstring).
    """
    i2t, t2i = retrieval_ranks(scores, text_to_image, max_chunk_elements=max_chunk_elements)
    a, b = _rank_summary(i2t, "i2t"), _rank_summary(t2i, "t2i")
    merged = {**a, **b}
    merged["rsum"] = sum(merged[key] for key in RECALL_KEYS)
    return {key: merged[key] for key in METRIC_KEYS}


def retrieval_metrics_identical_captions(
    scores: np.ndarray | torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    captions: Sequence[str],
    *,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> dict[str, float]:
    """`retrieval_metrics` where a caption also counts as correct for every image that has an identical
    caption (the same `caption_key`: case and spacing ignored), in both directions.

    Datasets whose captions repeat across images (titles such as "a red apple") make the strict protocol
    unwinnable: two images with the same caption cannot both rank first. Keys as `retrieval_metrics`;
    with no repeated caption the two give the same numbers.
    """
    s = _as_scores(scores)
    num_images, num_texts = s.shape
    t2i = _as_text_to_image(text_to_image, num_images, num_texts, s.device)
    if len(captions) != num_texts:
        raise ValueError(f"got {len(captions)} captions for {num_texts} score columns")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN; expected finite or ±inf values")
    groups = torch.from_numpy(caption_ids(captions)).to(s.device)
    image_has_group = torch.zeros(num_images, int(groups.max()) + 1, dtype=torch.bool, device=s.device)
    image_has_group[t2i, groups] = True  # [N_img, N_groups]
    i2t = torch.empty(num_images, dtype=torch.int64, device=s.device)
    step = _chunk_size(num_texts, max_chunk_elements)
    for start in range(0, num_images, step):
        block, positive = s[start : start + step], image_has_group[start : start + step][:, groups]
        best = block.masked_fill(~positive, -torch.inf).amax(dim=1, keepdim=True)
        i2t[start : start + step] = 1 + ((block >= best) & ~positive).sum(dim=1)
    t2i_ranks = torch.empty(num_texts, dtype=torch.int64, device=s.device)
    step = _chunk_size(num_images, max_chunk_elements)
    for start in range(0, num_texts, step):
        block, positive = s[:, start : start + step], image_has_group[:, groups[start : start + step]]
        best = block.masked_fill(~positive, -torch.inf).amax(dim=0, keepdim=True)
        t2i_ranks[start : start + step] = 1 + ((block >= best) & ~positive).sum(dim=0)
    merged = {**_rank_summary(i2t.cpu().numpy(), "i2t"), **_rank_summary(t2i_ranks.cpu().numpy(), "t2i")}
    merged["rsum"] = sum(merged[key] for key in RECALL_KEYS)
    return {key: merged[key] for key in METRIC_KEYS}


def text_to_image_from_caption_ids(caption_ids: Sequence[Sequence[int]], num_texts: int) -> np.ndarray:
    """Invert per-image caption lists (`caption_ids[i]`: columns of image `i`) into `text_to_image` `[N_txt]`.

    Every column in `[0, num_texts)` must be listed exactly once.
    """
    lengths = [len(ids) for ids in caption_ids]
    flat = np.fromiter((int(j) for ids in caption_ids for j in ids), dtype=np.int64, count=sum(lengths))
    bad = np.flatnonzero((flat < 0) | (flat >= num_texts))
    if bad.size:
        raise ValueError(f"caption index {int(flat[bad[0]])} is out of range; expected [0, {num_texts})")
    counts = np.bincount(flat, minlength=num_texts)
    if (counts != 1).any():
        j = int(np.flatnonzero(counts != 1)[0])
        raise ValueError(
            f"each caption column must belong to exactly one image, but column {j} is listed "
            f"{int(counts[j])} times"
        )
    text_to_image = np.empty(num_texts, dtype=np.int64)
    text_to_image[flat] = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    return text_to_image

"""The peer baseline: GRM's three similarity levels computed on the SCAN/LAPS evaluation schedule.

SCAN (`shard_xattn_*`) and LAPS (`shard_attn_scores` + `forward_sim`) score a test set by splitting images
and captions into shards (100 each in LAPS) and, inside a shard pair, looping over the captions one at a
time: caption `i` is trimmed to its length, repeated for every image of the shard
(`cap_i.repeat(n_image, 1, 1)`), and a batched product against the shard's image tokens gives the
`[n_image, n_word, L_v]` similarities, which are LeakyReLU'd, max-pooled both ways and averaged
(LAPS' `mask_xattn_one_text`). This file re-implements that schedule for GRM's three levels (original,
key with the adapters' soft masks, uncertainty against the K region tokens), one cross-attention per
level as a straight port would do, with features L2-normalised once up front as LAPS does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from granalign import GranAlignImageOutput, GranAlignTextOutput


def _xattn_one_text(
    images: torch.Tensor,
    image_weights: torch.Tensor,
    caption: torch.Tensor,
    caption_weights: torch.Tensor,
    image_mask: torch.Tensor,
    slope: float,
) -> torch.Tensor:
    """One caption against a shard of images, LAPS style → `[n_image]`.

    images `[n, L_v, d]` (already scaled), caption `[n_word, d]` (already scaled), weights for the means.
    """
    n_image = images.shape[0]
    caption_expand = caption.repeat(n_image, 1, 1)  # [n, n_word, d], as in LAPS
    sim = F.leaky_relu(
        torch.bmm(caption_expand, images.transpose(1, 2)), negative_slope=slope
    )  # [n, n_word, L_v]
    row = (sim - 1000 * (1 - image_mask).unsqueeze(1)).max(dim=2)[0]  # [n, n_word]: best patch per word
    row_mean = (row * caption_weights).sum(1) / caption_weights.sum().clamp_min(1e-6)
    column = sim.max(dim=1)[0]  # [n, L_v]: best word per patch
    column_mean = (column * image_weights).sum(1) / image_weights.sum(1).clamp_min(1e-6)
    return row_mean + column_mean


@torch.no_grad()
def laps_style_scores(
    images: GranAlignImageOutput,
    texts: GranAlignTextOutput,
    level_weights: tuple[float, float, float] = (0.4, 0.4, 0.2),
    slope: float = 0.1,
    shard_size: int = 100,
) -> torch.Tensor:
    """GRM scores `[N_img, N_txt]` with the sharded per-caption loop of SCAN/LAPS evaluation."""
    a, b, c = level_weights
    image_mask = images.token_mask.float()
    image_keep = images.keep_weights.float() * image_mask
    unit_images = F.normalize(images.tokens.float(), dim=-1) * image_mask[..., None]
    key_images = unit_images * image_keep[..., None]
    regions = F.normalize(images.region_tokens.float(), dim=-1)
    region_mask = torch.ones(regions.shape[:2])
    unit_captions = F.normalize(texts.tokens.float(), dim=-1)
    caption_keep = texts.keep_weights.float()
    lengths = texts.token_mask.sum(1).tolist()

    num_images, num_texts = unit_images.shape[0], unit_captions.shape[0]
    scores = torch.zeros(num_images, num_texts)
    for im_start in range(0, num_images, shard_size):
        im_end = min(im_start + shard_size, num_images)
        shard_images, shard_key, shard_regions = (
            unit_images[im_start:im_end], key_images[im_start:im_end], regions[im_start:im_end]
        )  # fmt: skip
        shard_mask, shard_keep = image_mask[im_start:im_end], image_keep[im_start:im_end]
        shard_region_mask = region_mask[im_start:im_end]
        for ca_start in range(0, num_texts, shard_size):
            for i in range(ca_start, min(ca_start + shard_size, num_texts)):
                n_word = int(lengths[i])
                caption, keep = unit_captions[i, :n_word], caption_keep[i, :n_word]
                original = _xattn_one_text(
                    shard_images, shard_mask, caption, torch.ones_like(keep), shard_mask, slope
                )
                key = _xattn_one_text(shard_key, shard_keep, caption * keep[:, None], keep, shard_mask, slope)
                uncertainty = _xattn_one_text(
                    shard_regions, shard_region_mask, caption * keep[:, None], keep, shard_region_mask, slope
                )
                scores[im_start:im_end, i] = a * original + b * key + c * uncertainty
    return scores

"""A deliberately plain per-pair implementation of the GRM similarity, to check the fast path against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from granalign import GranAlignImageOutput, GranAlignTextOutput


def _pair_similarity(x, a, y, b, slope):
    """x [L_t, d] caption tokens with weights a [L_t]; y [L_v, d] image tokens with weights b [L_v]."""
    s = F.leaky_relu((F.normalize(x, dim=-1) * a[:, None]) @ (F.normalize(y, dim=-1) * b[:, None]).t(), slope)
    return (a * s.max(1).values).sum() / a.sum() + (b * s.max(0).values).sum() / b.sum()


def reference_levels(images: GranAlignImageOutput, texts: GranAlignTextOutput, slope: float = 0.1):
    """[3, N_img, N_txt] original / key / uncertainty similarities, one pair at a time."""
    num_images, num_texts = images.tokens.shape[0], texts.tokens.shape[0]
    out = torch.zeros(3, num_images, num_texts)
    for n in range(num_images):
        image_valid = images.token_mask[n].bool()
        y, b = images.tokens[n][image_valid].float(), images.keep_weights[n][image_valid].float()
        regions = images.region_tokens[n].float()
        for m in range(num_texts):
            text_valid = texts.token_mask[m].bool()
            x, a = texts.tokens[m][text_valid].float(), texts.keep_weights[m][text_valid].float()
            out[0, n, m] = _pair_similarity(x, torch.ones_like(a), y, torch.ones_like(b), slope)
            out[1, n, m] = _pair_similarity(x, a, y, b, slope)
            out[2, n, m] = _pair_similarity(x, a, regions, torch.ones(len(regions)), slope)
    return out

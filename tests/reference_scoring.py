"""A deliberately plain per-pair implementation of the GRM similarity, to check the fast path against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from granalign import GranAlignImageOutput, GranAlignTextOutput


def _pair_similarity(x, a, y, b, slope):
    """x [L_t, d] caption tokens with weights a [L_t]; y [L_v, d] image tokens with weights b [L_v]."""
    s = F.leaky_relu((F.normalize(x, dim=-1) * a[:, None]) @ (F.normalize(y, dim=-1) * b[:, None]).t(), slope)
    return (a * s.max(1).values).sum() / a.sum() + (b * s.max(0).values).sum() / b.sum()


def _mean_similarity(x, a, y, b):
    """Cosine of the a-weighted mean of the unit caption tokens with the b-weighted mean of the image's."""
    text = (F.normalize(x, dim=-1) * a[:, None]).sum(0) / a.sum()
    image = (F.normalize(y, dim=-1) * b[:, None]).sum(0) / b.sum()
    return F.cosine_similarity(text, image, dim=0)


def reference_levels(
    images: GranAlignImageOutput, texts: GranAlignTextOutput, slope: float = 0.1, pooling: str = "token_max"
):
    """[3, N_img, N_txt] original / key / uncertainty similarities, one pair at a time (uncertainty 0 for
    images without region tokens; `pooling="mean"`: cosines of weighted-mean embeddings)."""
    num_images, num_texts = images.tokens.shape[0], texts.tokens.shape[0]

    def similarity(x, a, y, b):
        return _pair_similarity(x, a, y, b, slope) if pooling == "token_max" else _mean_similarity(x, a, y, b)

    out = torch.zeros(3, num_images, num_texts)
    for n in range(num_images):
        image_valid = images.token_mask[n].bool()
        y, b = images.tokens[n][image_valid].float(), images.keep_weights[n][image_valid].float()
        regions = None if images.region_tokens is None else images.region_tokens[n].float()
        for m in range(num_texts):
            text_valid = texts.token_mask[m].bool()
            x, a = texts.tokens[m][text_valid].float(), texts.keep_weights[m][text_valid].float()
            out[0, n, m] = similarity(x, torch.ones_like(a), y, torch.ones_like(b))
            out[1, n, m] = similarity(x, a, y, b)
            if regions is not None:
                out[2, n, m] = similarity(x, a, regions, torch.ones(len(regions)))
    return out


def reference_scores(config, images: GranAlignImageOutput, texts: GranAlignTextOutput):
    """[N_img, N_txt] GRM scores from `reference_levels`: `a·S_ori + b·S_key + c·S_unc` (c = 0 without region
    prompting) plus `g·cos` of the global embeddings, written out from the config's fields."""
    levels = reference_levels(images, texts, config.similarity_negative_slope, config.similarity_pooling)
    a, b, c = config.level_weights
    scores = a * levels[0] + b * levels[1] + (c if config.use_region_prompting else 0.0) * levels[2]
    global_cosines = (
        F.normalize(images.image_embeds.float(), dim=-1) @ F.normalize(texts.text_embeds.float(), dim=-1).t()
    )
    return scores + config.global_level_weight * global_cosines

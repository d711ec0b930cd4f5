"""Fine-grained image-text similarity: masked bidirectional token max-pooling, chunked over pairs.

For caption tokens `x_i` with weights `a_i` and image tokens `y_j` with weights `b_j`,
`s_ij = LeakyReLU(a_i b_j cos(x_i, y_j))` and

    sim = Σ_i a_i max_j s_ij / Σ_i a_i  +  Σ_j b_j max_i s_ij / Σ_j b_j,

with padding excluded from both the maxima and the means. Three levels share this pooling:
`original` (a, b = 1 on real tokens), `key` (a, b = the adapters' keep probabilities) and `uncertainty`
(caption tokens with their keep probabilities against the K region tokens, b = 1).

The work is split into a *coding* step, done once per item (normalise, append two masking coordinates),
and a *pooling* step on chunks of items: one matrix product gives every token cosine of a chunk of
images against a chunk of captions, `[n_img, L_v, n_txt, L_t]`, so memory is bounded by the chunk sizes.
The original and key levels share that product: as the weights are non-negative scalars,
`max_j a_i b_j c_ij = a_i · max_j b_j c_ij`. Travels to the Hub with a checkpoint: imports only torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "CodedImages",
    "CodedTexts",
    "code_images",
    "code_texts",
    "length_sorted",
    "level_similarities",
    "mean_pooled_similarities",
    "pooled_similarity",
]

# Added to the cosine of a padding token so it never wins a max (cosines lie in [-1, 1]); fits in fp16.
_PADDING_PENALTY = 1e4


class CodedImages(NamedTuple):
    """Image side ready for pooling. N images, L_v tokens, K regions, d + 2 coded features."""

    tokens: torch.Tensor  # [N, L_v, d + 2] unit tokens + (padding penalty, 1)
    weights: torch.Tensor  # [N, L_v] keep probabilities, 0 at padding
    scales: torch.Tensor  # [N, L_v] keep probabilities, 1 at padding (keeps the penalty intact)
    valid: torch.Tensor  # [N, L_v] 1 for real tokens
    regions: torch.Tensor | None  # [N, K, d + 2] unit region tokens + (0, 1); None without regions


class CodedTexts(NamedTuple):
    """Caption side ready for pooling. M captions, L_t tokens, d + 2 coded features."""

    tokens: torch.Tensor  # [M, L_t, d + 2] unit tokens + (1, padding penalty)
    weights: torch.Tensor  # [M, L_t] keep probabilities, 0 at padding
    scales: torch.Tensor  # [M, L_t] keep probabilities, 1 at padding
    valid: torch.Tensor  # [M, L_t] 1 for real tokens


def _code(
    tokens: torch.Tensor, valid: torch.Tensor, image_side: bool, dtype: torch.dtype | None
) -> torch.Tensor:
    """Unit-normalise `[N, L, d]` tokens and append the two masking coordinates → `[N, L, d + 2]`.

    An image token carries `(−P·[padding], 1)` and a caption token `(1, −P·[padding])`, so the dot product
    of two coded tokens is their cosine minus P for each padding token involved.
    """
    unit = F.normalize(tokens.float(), dim=-1)
    penalty = (1.0 - valid.float()).unsqueeze(-1) * -_PADDING_PENALTY
    ones = torch.ones_like(penalty)
    coded = torch.cat([unit, penalty, ones] if image_side else [unit, ones, penalty], dim=-1)
    return coded.to(dtype) if dtype is not None else coded


def code_images(
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    keep_weights: torch.Tensor,
    region_tokens: torch.Tensor | None,
    dtype: torch.dtype | None = None,
) -> CodedImages:
    """Code the image side: tokens `[N, L_v, d]`, mask and keep weights `[N, L_v]`, regions `[N, K, d]`."""
    valid = token_mask.float()
    weights = keep_weights.float() * valid
    regions = None
    if region_tokens is not None:
        regions_valid = torch.ones(region_tokens.shape[:2], device=region_tokens.device)
        regions = _code(region_tokens, regions_valid, image_side=True, dtype=dtype)
    return CodedImages(
        tokens=_code(tokens, valid, image_side=True, dtype=dtype),
        weights=weights,
        scales=torch.where(valid > 0, weights, torch.ones_like(weights)),
        valid=valid,
        regions=regions,
    )


def code_texts(
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    keep_weights: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> CodedTexts:
    """Code the caption side: tokens `[M, L_t, d]`, mask and keep weights `[M, L_t]`."""
    valid = token_mask.float()
    weights = keep_weights.float() * valid
    return CodedTexts(
        tokens=_code(tokens, valid, image_side=False, dtype=dtype),
        weights=weights,
        scales=torch.where(valid > 0, weights, torch.ones_like(weights)),
        valid=valid,
    )


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    return (values * weights).sum(dim) / weights.sum(dim).clamp_min(1e-6)


def pooled_similarity(
    cosine: torch.Tensor,
    image_weights: torch.Tensor,
    text_weights: torch.Tensor,
    negative_slope: float,
    image_scales: torch.Tensor | None = None,
    text_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional max-pooling of one chunk's token cosines.

    Args:
        cosine: `[n, L_v, m, L_t]` cosines, padding pairs pushed below −1.
        image_weights: `[n, L_v]` weights b of the image-side mean (0 at padding).
        text_weights: `[m, L_t]` weights a of the caption-side mean (0 at padding), shared by all images;
            or `[n, m, L_t]` when every image has its own `m` captions (the gathered pairs of a rerank).
        negative_slope: LeakyReLU slope.
        image_scales, text_scales: per-token feature scales (the soft masks, 1 at padding), or `None` for 1;
            shaped as the weights of their side.

    Returns:
        `[n, m]` similarities (float32).
    """
    scaled = cosine if image_scales is None else cosine * image_scales[:, :, None, None].to(cosine.dtype)
    text_best = scaled.amax(dim=1).float()  # [n, m, L_t]: best image token for each caption token
    if text_scales is not None:
        text_best = text_best * text_scales
    # [m, L_t] or [n, m, L_t] → broadcasts over the image-token axis of [n, L_v, m, L_t]
    scaled = cosine if text_scales is None else cosine * text_scales.unsqueeze(-3).to(cosine.dtype)
    image_best = scaled.amax(dim=3).float()  # [n, L_v, m]: best caption token for each image token
    if image_scales is not None:
        image_best = image_best * image_scales[:, :, None]
    text_term = _weighted_mean(F.leaky_relu(text_best, negative_slope), text_weights, dim=-1)
    image_term = _weighted_mean(F.leaky_relu(image_best, negative_slope), image_weights[:, :, None], dim=1)
    return text_term + image_term


def _pairwise_cosine(image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
    """`[n, L_v, d + 2]` × `[m, L_t, d + 2]` coded tokens → `[n, L_v, m, L_t]` in one matrix product."""
    n, length_v, dim = image_tokens.shape
    m, length_t, _ = text_tokens.shape
    flat = image_tokens.reshape(n * length_v, dim) @ text_tokens.reshape(m * length_t, dim).t()
    return flat.view(n, length_v, m, length_t)


def length_sorted(texts: CodedTexts) -> tuple[torch.Tensor, CodedTexts, torch.Tensor]:
    """Captions reordered by the number of columns they use (last real token + 1), shortest first.

    Returns `order` `[M]` (caption `order[j]` is row `j` of the result), the reordered `CodedTexts` and the
    used widths `[M]` in that order. A chunk of neighbouring rows can then drop the padding columns none of
    its captions uses (`[:, :widths[chunk].max()]`) without changing any score: a padding column never
    wins a max (its cosine is pushed below −1) and weighs 0 in every mean.
    """
    columns = torch.arange(1, texts.valid.shape[1] + 1, device=texts.valid.device)
    used = ((texts.valid > 0) * columns).amax(dim=1)  # [M]
    widths, order = torch.sort(used, stable=True)
    return order, CodedTexts(*(field[order] for field in texts)), widths


class _TokenMaxima(torch.autograd.Function):
    """The token maxima of the original and key levels, with a backward that never stores the cosines.

    Forward (no graph): one product gives the cosines `c` `[n, L_v, m, L_t]`; returns, for the original
    level, `max_j c_ij` `[n, m, L_t]` and `max_i c_ij` `[n, L_v, m]`, and for the key level the same
    maxima of `b_j c_ij` and `a_i c_ij` (b, a the per-token scales). Backward: the gradient of a maximum
    goes to its argmax only, so the gradient of the cosines is a sparse scatter of the output gradients;
    two matrix products turn it into token gradients. Autograd through `pooled_similarity` instead keeps
    several `n · L_v · m · L_t` tensors per level and is several times slower on CPU. Ties (measure zero
    for real tokens) send the whole gradient to one argmax instead of splitting it.
    """

    @staticmethod
    def forward(ctx, image_tokens, text_tokens, image_scales, text_scales):
        cosine = _pairwise_cosine(image_tokens, text_tokens)  # [n, L_v, m, L_t]
        text_original, text_original_at = cosine.max(dim=1)  # [n, m, L_t]
        image_original, image_original_at = cosine.max(dim=3)  # [n, L_v, m]
        text_key, text_key_at = (cosine * image_scales[:, :, None, None].to(cosine.dtype)).max(dim=1)
        image_key, image_key_at = (cosine * text_scales[None, None].to(cosine.dtype)).max(dim=3)
        # raw cosines at the key-level argmaxes: the gradients of the scales
        ctx.text_key_cos = cosine.gather(1, text_key_at.unsqueeze(1)).squeeze(1)
        ctx.image_key_cos = cosine.gather(3, image_key_at.unsqueeze(3)).squeeze(3)
        ctx.save_for_backward(image_tokens, text_tokens, image_scales, text_scales)
        ctx.argmaxes = (text_original_at, image_original_at, text_key_at, image_key_at)
        return text_original, image_original, text_key, image_key

    @staticmethod
    def backward(ctx, grad_text_original, grad_image_original, grad_text_key, grad_image_key):
        image_tokens, text_tokens, image_scales, text_scales = ctx.saved_tensors
        text_original_at, image_original_at, text_key_at, image_key_at = ctx.argmaxes
        n, length_v, dim = image_tokens.shape
        m, length_t, _ = text_tokens.shape
        grad = image_tokens.new_zeros((n, length_v, m, length_t))
        b = image_scales.to(grad.dtype)
        a = text_scales.to(grad.dtype)
        grad.scatter_add_(1, text_original_at.unsqueeze(1), grad_text_original.to(grad.dtype).unsqueeze(1))
        grad.scatter_add_(3, image_original_at.unsqueeze(3), grad_image_original.to(grad.dtype).unsqueeze(3))
        b_at = b.gather(1, text_key_at.reshape(n, -1)).view_as(text_key_at)
        grad.scatter_add_(1, text_key_at.unsqueeze(1), (grad_text_key * b_at).unsqueeze(1))
        a_at = a[torch.arange(m, device=a.device)[None, None, :], image_key_at]  # [n, L_v, m]
        grad.scatter_add_(3, image_key_at.unsqueeze(3), (grad_image_key * a_at).unsqueeze(3))
        flat = grad.view(n * length_v, m * length_t)
        grad_image = (flat @ text_tokens.reshape(m * length_t, dim).to(grad.dtype)).view(n, length_v, dim)
        grad_text = (flat.t() @ image_tokens.reshape(n * length_v, dim).to(grad.dtype)).view(m, length_t, dim)
        grad_b = torch.zeros_like(b).scatter_add_(
            1, text_key_at.reshape(n, -1), (grad_text_key * ctx.text_key_cos).reshape(n, -1)
        )
        grad_a = torch.zeros_like(a).index_put_(
            (torch.arange(m, device=a.device)[None, None, :].expand_as(image_key_at), image_key_at),
            grad_image_key * ctx.image_key_cos,
            accumulate=True,
        )
        return (
            grad_image.to(image_tokens.dtype),
            grad_text.to(text_tokens.dtype),
            grad_b.to(image_scales.dtype),
            grad_a.to(text_scales.dtype),
        )


def _pool_maxima(
    text_best: torch.Tensor,
    image_best: torch.Tensor,
    image_weights: torch.Tensor,
    text_weights: torch.Tensor,
    negative_slope: float,
) -> torch.Tensor:
    """`pooled_similarity` from its maxima: text_best `[n, m, L_t]`, image_best `[n, L_v, m]` → `[n, m]`."""
    text_term = _weighted_mean(F.leaky_relu(text_best.float(), negative_slope), text_weights, dim=-1)
    image_term = _weighted_mean(
        F.leaky_relu(image_best.float(), negative_slope), image_weights[:, :, None], dim=1
    )
    return text_term + image_term


def _token_levels_with_sparse_backward(
    images: CodedImages, texts: CodedTexts, negative_slope: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original and key levels `[n, m]` each, through `_TokenMaxima` (training)."""
    text_original, image_original, text_key, image_key = _TokenMaxima.apply(
        images.tokens, texts.tokens, images.scales, texts.scales
    )
    original = _pool_maxima(text_original, image_original, images.valid, texts.valid, negative_slope)
    key = _pool_maxima(
        text_key.float() * texts.scales,
        image_key.float() * images.scales[:, :, None],
        images.weights,
        texts.weights,
        negative_slope,
    )
    return original, key


def level_similarities(images: CodedImages, texts: CodedTexts, negative_slope: float) -> torch.Tensor:
    """The three GRM similarity levels for every image-caption pair of one chunk → `[3, n, m]`.

    Rows are `original`, `key` and `uncertainty` (zeros for a model without regions). Memory:
    `n · L_v · m · L_t` cosines. When gradients are needed, the token maxima go through `_TokenMaxima`,
    whose backward does not keep the cosines (same values, same gradients up to ties).
    """
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (images.tokens, texts.tokens, images.scales, texts.scales)
    )
    if needs_grad:
        original, key = _token_levels_with_sparse_backward(images, texts, negative_slope)
    else:
        original, key = _token_levels(images, texts, negative_slope)
    if images.regions is None:
        return torch.stack([original, key, torch.zeros_like(original)])
    region_cosine = _pairwise_cosine(images.regions, texts.tokens)
    uncertainty = pooled_similarity(
        region_cosine,
        torch.ones(region_cosine.shape[:2], device=region_cosine.device),
        texts.weights,
        negative_slope,
        text_scales=texts.scales,
    )
    return torch.stack([original, key, uncertainty])


def _token_levels(
    images: CodedImages, texts: CodedTexts, negative_slope: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original and key levels `[n, m]` each, from one cosine product (the reference path)."""
    cosine = _pairwise_cosine(images.tokens, texts.tokens)
    original = pooled_similarity(cosine, images.valid, texts.valid, negative_slope)
    key = pooled_similarity(
        cosine,
        images.weights,
        texts.weights,
        negative_slope,
        image_scales=images.scales.to(cosine.dtype),
        text_scales=texts.scales,
    )
    return original, key


def _mean_embedding(coded: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Unit weighted mean `[N, d]` of coded unit tokens `[N, L, d + 2]` with weights `[N, L]`."""
    unit = coded[..., :-2].float()
    return F.normalize(_weighted_mean(unit, weights.unsqueeze(-1), dim=1), dim=-1)


def mean_pooled_similarities(images: CodedImages, texts: CodedTexts) -> torch.Tensor:
    """The three levels with mean pooling instead of max pooling (the global dual-encoder baseline).

    Each level is the cosine of the weighted-mean unit embeddings of both sides → `[3, n, m]`.
    """
    text_all, text_kept = (
        _mean_embedding(texts.tokens, texts.valid),
        _mean_embedding(texts.tokens, texts.weights),
    )
    original = _mean_embedding(images.tokens, images.valid) @ text_all.t()
    key = _mean_embedding(images.tokens, images.weights) @ text_kept.t()
    if images.regions is None:
        return torch.stack([original, key, torch.zeros_like(original)])
    regions_valid = torch.ones(images.regions.shape[:2], device=images.regions.device)
    uncertainty = _mean_embedding(images.regions, regions_valid) @ text_kept.t()
    return torch.stack([original, key, uncertainty])

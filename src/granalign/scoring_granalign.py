"""The GRM score, defined once: its three levels, their pooling, and how they combine.

For caption tokens `x_i` with weights `a_i` and image tokens `y_j` with weights `b_j`,
`s_ij = LeakyReLU(a_i b_j cos(x_i, y_j))` and

    sim = Σ_i a_i max_j s_ij / Σ_i a_i  +  Σ_j b_j max_i s_ij / Σ_j b_j,

with padding excluded from both the maxima and the means (a late interaction, as ColBERT's, both ways:
the image side never sees the caption, so both sides are encoded and cached once). Three levels share
this pooling: `original` (a, b = 1 on real tokens), `key` (a, b = the adapters' keep probabilities) and
`uncertainty` (caption tokens with their keep probabilities against the K region tokens, b = 1; zero for
a model without regions). With `similarity_pooling="mean"` each level is instead the cosine of the
weighted-mean unit embeddings of both sides (the global dual-encoder baseline). The score is
`a·S_ori + b·S_key + c·S_unc` with the config's `effective_level_weights`, plus `g·cos` of the global
embeddings when `global_level_weight` g > 0 (`combine_levels`).

Everything that scores pairs goes through `level_similarities` / `region_similarities` and
`combine_levels`: `GranAlignModel.score` and `level_scores` (all pairs, `chunked_level_similarities`),
training (the same, with a backward that never stores the cosines), the two-stage re-rank of gathered
pairs (`granalign.retrieval.rerank`: captions grouped per image) and its first stage (the region level
alone, `chunked_region_similarities`).

The work is split into a *coding* step, done once per item (normalise, append two masking coordinates),
and a *pooling* step on chunks of items: one matrix product gives every token cosine of a chunk of
images against a chunk of captions, `[n_img, L_v, n_txt, L_t]`, so memory is bounded by the chunk sizes.
The original and key levels share that product: as the weights are non-negative scalars,
`max_j a_i b_j c_ij = a_i · max_j b_j c_ij`. Captions come in one of two layouts: `[m, L_t, ...]`, shared
by every image of the chunk (all pairs), or `[n, m, L_t, ...]`, each image's own `m` captions (gathered
pairs, one batched product). Travels to the Hub with a checkpoint: imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "POOLINGS",
    "CodedImages",
    "CodedTexts",
    "chunked_level_similarities",
    "chunked_region_similarities",
    "code_images",
    "code_regions",
    "code_texts",
    "combine_levels",
    "global_similarities",
    "length_sorted",
    "level_similarities",
    "pooled_similarity",
    "region_similarities",
    "token_similarities",
    "token_widths",
]

#: The values of `config.similarity_pooling`.
POOLINGS = ("token_max", "mean")

# Added to the cosine of a padding token so it never wins a max (cosines lie in [-1, 1]); fits in fp16.
_PADDING_PENALTY = 1e4


class CodedImages(NamedTuple):
    """Image side ready for pooling. N images, L_v tokens, K regions, d + 2 coded features.

    `code_regions` leaves the four token fields `None` (the region level reads only `regions`)."""

    tokens: torch.Tensor | None  # [N, L_v, d + 2] unit tokens + (padding penalty, 1)
    weights: torch.Tensor | None  # [N, L_v] keep probabilities, 0 at padding
    scales: torch.Tensor | None  # [N, L_v] keep probabilities, 1 at padding (keeps the penalty intact)
    valid: torch.Tensor | None  # [N, L_v] 1 for real tokens
    regions: torch.Tensor | None  # [N, K, d + 2] unit region tokens + (0, 1); None without regions


class CodedTexts(NamedTuple):
    """Caption side ready for pooling. M captions, L_t tokens, d + 2 coded features.

    Fields may carry a leading image axis, `[n, m, L_t, ...]`: each image of a chunk with its own captions.
    """

    tokens: torch.Tensor  # [M, L_t, d + 2] unit tokens + (1, padding penalty)
    weights: torch.Tensor  # [M, L_t] keep probabilities, 0 at padding
    scales: torch.Tensor  # [M, L_t] keep probabilities, 1 at padding
    valid: torch.Tensor  # [M, L_t] 1 for real tokens


def token_widths(mask: torch.Tensor) -> torch.Tensor:
    """Columns each row of a `[..., L]` token mask uses: its last real token + 1 (0 for no real token).

    The one definition of "padding that can be dropped": columns past a row's width are padding, and a
    padding column never wins a max (its cosine is pushed below −1) and weighs 0 in every mean, so cutting
    a set of rows to their widest width changes no score.
    """
    columns = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask.ne(0) * columns).amax(dim=-1)


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


def _code_regions(region_tokens: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    valid = torch.ones(region_tokens.shape[:2], device=region_tokens.device)
    return _code(region_tokens, valid, image_side=True, dtype=dtype)


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
    return CodedImages(
        tokens=_code(tokens, valid, image_side=True, dtype=dtype),
        weights=weights,
        scales=torch.where(valid > 0, weights, torch.ones_like(weights)),
        valid=valid,
        regions=None if region_tokens is None else _code_regions(region_tokens, dtype),
    )


def code_regions(region_tokens: torch.Tensor, dtype: torch.dtype | None = None) -> CodedImages:
    """Code the region tokens `[N, K, d]` alone (all the region level needs); the token fields are None."""
    return CodedImages(None, None, None, None, _code_regions(region_tokens, dtype))


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
    """Coded image tokens `[n, L_v, d + 2]` against coded caption tokens → cosines `[n, L_v, m, L_t]`.

    Captions `[m, L_t, d + 2]` are shared by every image (one matrix product over all pairs); captions
    `[n, m, L_t, d + 2]` are each image's own (one batched product: the gathered pairs of a re-rank).
    """
    n, length_v, dim = image_tokens.shape
    if text_tokens.dim() == 4:
        m, length_t = text_tokens.shape[1:3]
        flat = torch.bmm(image_tokens, text_tokens.reshape(n, m * length_t, dim).transpose(1, 2))
        return flat.view(n, length_v, m, length_t)
    m, length_t, _ = text_tokens.shape
    flat = image_tokens.reshape(n * length_v, dim) @ text_tokens.reshape(m * length_t, dim).t()
    return flat.view(n, length_v, m, length_t)


def length_sorted(texts: CodedTexts) -> tuple[torch.Tensor, CodedTexts, torch.Tensor]:
    """Captions reordered by the number of columns they use (`token_widths`), shortest first.

    Returns `order` `[M]` (caption `order[j]` is row `j` of the result), the reordered `CodedTexts` and the
    used widths `[M]` in that order. A chunk of neighbouring rows can then drop the padding columns none of
    its captions uses (`[:, :widths[chunk].max()]`) without changing any score.
    """
    widths, order = torch.sort(token_widths(texts.valid), stable=True)
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
    """Unit weighted mean `[..., d]` of coded unit tokens `[..., L, d + 2]` with weights `[..., L]`."""
    unit = coded[..., :-2].float()
    return F.normalize(_weighted_mean(unit, weights.unsqueeze(-1), dim=-2), dim=-1)


def _mean_cosines(image_means: torch.Tensor, text_means: torch.Tensor) -> torch.Tensor:
    """Cosines `[n, m]` of unit image means `[n, d]` with caption means `[m, d]` or `[n, m, d]`."""
    if text_means.dim() == 3:
        return (text_means @ image_means.unsqueeze(-1)).squeeze(-1)
    return image_means @ text_means.t()


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown similarity pooling {pooling!r}; expected one of {POOLINGS}")


def token_similarities(
    images: CodedImages, texts: CodedTexts, negative_slope: float, pooling: str = "token_max"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original and key levels `[n, m]` each, for either caption layout (see the module docstring).

    With gradients and shared captions (training), the token maxima go through `_TokenMaxima`, whose
    backward does not keep the cosines (same values, same gradients up to ties).
    """
    _check_pooling(pooling)
    if pooling == "mean":
        original = _mean_cosines(
            _mean_embedding(images.tokens, images.valid), _mean_embedding(texts.tokens, texts.valid)
        )
        key = _mean_cosines(
            _mean_embedding(images.tokens, images.weights), _mean_embedding(texts.tokens, texts.weights)
        )
        return original, key
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (images.tokens, texts.tokens, images.scales, texts.scales)
    )
    if needs_grad and texts.tokens.dim() == 3:
        return _token_levels_with_sparse_backward(images, texts, negative_slope)
    return _token_levels(images, texts, negative_slope)


def region_similarities(
    images: CodedImages, texts: CodedTexts, negative_slope: float, pooling: str = "token_max"
) -> torch.Tensor:
    """The uncertainty level `S_unc` `[n, m]`: keep-weighted caption tokens against the K region tokens.

    Needs `images.regions` (a model with region prompting); either caption layout.
    """
    _check_pooling(pooling)
    regions = images.regions
    if regions is None:
        raise ValueError("the region level needs region tokens; these images have none")
    ones = torch.ones(regions.shape[:2], device=regions.device)
    if pooling == "mean":
        return _mean_cosines(_mean_embedding(regions, ones), _mean_embedding(texts.tokens, texts.weights))
    cosine = _pairwise_cosine(regions, texts.tokens)
    return pooled_similarity(cosine, ones, texts.weights, negative_slope, text_scales=texts.scales)


def level_similarities(
    images: CodedImages, texts: CodedTexts, negative_slope: float, pooling: str = "token_max"
) -> torch.Tensor:
    """The three GRM levels of one chunk → `[3, n, m]`: `original`, `key` and `uncertainty` (zeros for
    images without regions). Captions `[m, ...]` give every image-caption pair; captions `[n, m, ...]`
    give image `b` with each of its own `m` captions. Memory: `n · L_v · m · L_t` cosines (token_max).
    """
    original, key = token_similarities(images, texts, negative_slope, pooling)
    if images.regions is None:
        return torch.stack([original, key, torch.zeros_like(original)])
    return torch.stack([original, key, region_similarities(images, texts, negative_slope, pooling)])


# ------------------------------------------------------------------ every pair, chunk by chunk


def _rows(coded: Any, index: Any) -> Any:
    return type(coded)(*(None if field is None else field[index] for field in coded))


def _chunked(
    similarities: Callable[[CodedImages, CodedTexts], torch.Tensor],
    images: CodedImages,
    texts: CodedTexts,
    levels: tuple[int, ...],
    image_chunk_size: int,
    text_chunk_size: int,
    whole: bool = False,
) -> torch.Tensor:
    """`similarities(image_chunk, text_chunk)` → `[*levels, n, m]` for every pair, chunk by chunk.

    Captions go in length-sorted chunks, each cut to the columns its captions use: no work on padding.
    `whole` scores everything at once (mean pooling: its memory is that of the `[N, M]` output anyway).
    """
    if image_chunk_size < 1 or text_chunk_size < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {image_chunk_size} and {text_chunk_size}")
    num_images = (images.tokens if images.tokens is not None else images.regions).shape[0]
    num_texts = texts.tokens.shape[0]
    if whole or (num_images <= image_chunk_size and num_texts <= text_chunk_size):
        return similarities(images, texts)
    if num_texts > text_chunk_size:
        order, texts, widths = length_sorted(texts)
    else:  # one chunk of captions: sorting cannot narrow it (and would copy them all)
        order, widths = None, token_widths(texts.valid)
    scores = texts.tokens.new_empty((*levels, num_images, num_texts), dtype=torch.float32)
    for i in range(0, num_images, image_chunk_size):
        image_chunk = _rows(images, slice(i, i + image_chunk_size))
        for j in range(0, num_texts, text_chunk_size):
            width = max(int(widths[j : j + text_chunk_size].max()), 1)
            text_chunk = CodedTexts(*(field[j : j + text_chunk_size, :width] for field in texts))
            columns = slice(j, j + text_chunk_size) if order is None else order[j : j + text_chunk_size]
            scores[..., i : i + image_chunk_size, columns] = similarities(image_chunk, text_chunk)
    return scores


def chunked_level_similarities(
    images: CodedImages,
    texts: CodedTexts,
    negative_slope: float,
    pooling: str = "token_max",
    image_chunk_size: int = 16,
    text_chunk_size: int = 256,
) -> torch.Tensor:
    """`level_similarities` of every image with every caption → `[3, N_img, N_txt]` (float32).

    Peak memory is about `image_chunk_size · L_v · text_chunk_size · L_t` cosines (mean pooling needs no
    chunks: its levels are products of `[N, d]` means).
    """

    def levels(image_chunk: CodedImages, text_chunk: CodedTexts) -> torch.Tensor:
        return level_similarities(image_chunk, text_chunk, negative_slope, pooling)

    _check_pooling(pooling)
    return _chunked(levels, images, texts, (3,), image_chunk_size, text_chunk_size, pooling == "mean")


def chunked_region_similarities(
    images: CodedImages,
    texts: CodedTexts,
    negative_slope: float,
    pooling: str = "token_max",
    image_chunk_size: int = 64,
    text_chunk_size: int = 1024,
) -> torch.Tensor:
    """`region_similarities` of every image with every caption → `[N_img, N_txt]` (float32); the images
    may be coded by `code_regions`. Memory: `image_chunk_size · K · text_chunk_size · L_t` cosines."""

    def regions(image_chunk: CodedImages, text_chunk: CodedTexts) -> torch.Tensor:
        return region_similarities(image_chunk, text_chunk, negative_slope, pooling)

    _check_pooling(pooling)
    return _chunked(regions, images, texts, (), image_chunk_size, text_chunk_size, pooling == "mean")


# ------------------------------------------------------------------ the score


def global_similarities(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, paired: bool = False
) -> torch.Tensor:
    """Cosines of the unit global embeddings (float32): `[N, M]` for every pair of `[N, d]` and `[M, d]`,
    or `[P]` with `paired` (row p of each side is pair p)."""
    if paired:
        return (image_embeds * text_embeds).sum(-1).float()
    return (image_embeds @ text_embeds.t()).float()


def combine_levels(
    levels: torch.Tensor, config: Any, global_cosines: Callable[[], torch.Tensor] | None = None
) -> torch.Tensor:
    """The GRM score from its levels `[3, ...]`: `a·S_ori + b·S_key + c·S_unc` with
    `config.effective_level_weights` (c = 0 without region prompting), plus `g · global_cosines()` (the
    `global_similarities` of the same pairs, shaped as one level) when `config.global_level_weight` g > 0.
    """
    weights = torch.tensor(config.effective_level_weights, dtype=levels.dtype, device=levels.device)
    scores = torch.einsum("l,l...->...", weights, levels)
    global_weight = getattr(config, "global_level_weight", 0.0)
    if global_weight > 0:
        if global_cosines is None:
            raise ValueError("global_level_weight > 0: the score needs the global embeddings' cosines")
        scores = scores + global_weight * global_cosines().to(scores.device)
    return scores

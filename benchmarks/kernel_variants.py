"""Prototype formulations of the chunk kernel `scoring_granalign.level_similarities`, for benchmarking.

Each variant returns the same `[3, n, m]` levels (checked against the committed kernel before timing).
They differ only in how the `[n, L_v, m, L_t]` cosine tensor of a chunk is produced and reduced:

* ``committed``: the kernel as it is (one matmul; per level two max reductions, the key level through two
  full-size scaled copies). Every chunk allocates three fresh full-size tensors, which on CPU means
  page faults and kernel zeroing of ~3 x E x 4 bytes per chunk (E = n·L_v·m·L_t).
* ``buffers``: same arithmetic, but the cosine tensor and the scaled copy live in two buffers reused by
  every chunk of a `level_scores` call (`matmul(out=)`, `mul(out=)`): no allocation in the chunk loop.
* ``compiled``: the pooling of the committed kernel under `torch.compile` (inductor fuses the scale and
  the max into one pass; needs a C++ compiler; compiled once per chunk shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from granalign.scoring_granalign import CodedImages, CodedTexts, level_similarities, pooled_similarity


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    return (values * weights).sum(dim) / weights.sum(dim).clamp_min(1e-6)


class BufferedKernel:
    """`level_similarities` with the cosine tensor and one scaled copy kept in reusable buffers."""

    def __init__(self) -> None:
        self._cosine = torch.empty(0)
        self._scaled = torch.empty(0)

    def _buffer(self, name: str, size: int, like: torch.Tensor) -> torch.Tensor:
        buffer = getattr(self, name)
        if buffer.numel() < size or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = torch.empty(size, dtype=like.dtype, device=like.device)
            setattr(self, name, buffer)
        return buffer[:size]

    def __call__(self, images: CodedImages, texts: CodedTexts, negative_slope: float) -> torch.Tensor:
        n, length_v, dim = images.tokens.shape
        m, length_t, _ = texts.tokens.shape
        size = n * length_v * m * length_t
        cosine = self._buffer("_cosine", size, images.tokens).view(n * length_v, m * length_t)
        torch.matmul(
            images.tokens.reshape(n * length_v, dim), texts.tokens.reshape(m * length_t, dim).t(), out=cosine
        )
        cosine = cosine.view(n, length_v, m, length_t)
        scaled = self._buffer("_scaled", size, images.tokens).view(n, length_v, m, length_t)
        slope = negative_slope

        # original level: unscaled maxima both ways
        text_best = cosine.amax(dim=1).float()  # [n, m, L_t]
        image_best = cosine.amax(dim=3).float()  # [n, L_v, m]
        original = _weighted_mean(F.leaky_relu(text_best, slope), texts.valid, -1) + _weighted_mean(
            F.leaky_relu(image_best, slope), images.valid[:, :, None], 1
        )
        # key level: max_j b_j c_ij (image-scaled copy), then max_i a_i c_ij (text-scaled copy)
        image_scales = images.scales.to(cosine.dtype)
        torch.mul(cosine, image_scales[:, :, None, None], out=scaled)
        text_best = scaled.amax(dim=1).float() * texts.scales
        torch.mul(cosine, texts.scales.to(cosine.dtype), out=scaled)
        image_best = scaled.amax(dim=3).float() * images.scales[:, :, None]
        key = _weighted_mean(F.leaky_relu(text_best, slope), texts.weights, -1) + _weighted_mean(
            F.leaky_relu(image_best, slope), images.weights[:, :, None], 1
        )
        # uncertainty level: K region tokens, small
        region_cosine = (images.regions.reshape(-1, dim) @ texts.tokens.reshape(m * length_t, dim).t()).view(
            n, -1, m, length_t
        )
        uncertainty = pooled_similarity(
            region_cosine,
            torch.ones(region_cosine.shape[:2], device=region_cosine.device),
            texts.weights,
            slope,
            text_scales=texts.scales,
        )
        return torch.stack([original, key, uncertainty])


def compiled_kernel():
    """`level_similarities` under `torch.compile` (static shapes: one compilation per chunk shape)."""
    return torch.compile(level_similarities, dynamic=False)


VARIANTS = {
    "committed": lambda: level_similarities,
    "buffers": BufferedKernel,
    "compiled": compiled_kernel,
}


def chunked_levels(
    kernel, images: CodedImages, texts: CodedTexts, slope: float, image_chunk: int, text_chunk: int
):
    """Run a chunk kernel over all chunk pairs, as `GranAlignModel.level_scores` does → `[3, N, M]`."""
    num_images, num_texts = images.tokens.shape[0], texts.tokens.shape[0]
    out = torch.empty((3, num_images, num_texts))
    for i in range(0, num_images, image_chunk):
        image_part = CodedImages(*(field[i : i + image_chunk] for field in images))
        for j in range(0, num_texts, text_chunk):
            text_part = CodedTexts(*(field[j : j + text_chunk] for field in texts))
            out[:, i : i + image_chunk, j : j + text_chunk] = kernel(image_part, text_part, slope)
    return out
